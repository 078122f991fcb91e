"""The side-by-side comparison with an earlier revision (``enserve.loadtest.ab``): its parsing and
table as known answers, and one real run against this clone's HEAD."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from enserve.loadtest.ab import Arm, parse_arm, parse_cells, table
from enserve.loadtest.bench import Cell
from enserve.loadtest.launcher import shm_objects


def test_arms_and_cells_are_parsed_or_refused_in_words():
    assert parse_arm("objective=/r --objective-ms 1000") == ("objective", Path("/r"), ("--objective-ms", "1000"))
    for bad in ("objective", "=/r", "x=", "before=/r"):
        with pytest.raises(argparse.ArgumentTypeError, match="--arm"):
            parse_arm(bad)
    assert parse_cells("1x1,16x1,1x8") == [(1, 1), (16, 1), (1, 8)]
    for bad in ("1x", "0x1", "ax2", "1x2x3", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--cells"):
            parse_cells(bad)


def test_the_table_is_each_arms_median_round_and_cpu_over_the_earlier_revisions():
    def cell(arm, requests, cpu_s):  # 1 s rounds of 1-image requests
        return Cell(arm, 1, 1, requests, 1.0, np.array([1.0, 2.0, 3.0]), 0, cpu_s)

    got = {("before", 1, 1): [cell("before", 100, 0.01), cell("before", 300, 0.03), cell("before", 200, 0.02)],
           ("now", 1, 1): [cell("now", 190, 0.02), cell("now", 210, 0.02), cell("now", 220, 0.022)]}
    lines = table([Arm("before", Path(".")), Arm("now", Path("."))], got, [(1, 1)])
    # before: median 200 img/s, 60 ms of CPU over 600 requests = 100 us; now: 210, 62 ms / 620 = 100 us
    assert lines[2] == "| c1 x 1 | before | 200 | 2.00 | 1.000 | 100 | 1.000 | 0 |"
    assert lines[3] == "| c1 x 1 | now | 210 | 2.00 | 1.050 | 100 | 1.000 | 0 |"


def test_a_run_against_head_serves_every_arm_and_leaves_nothing(demo_repo, tmp_path):
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("not a git clone")
    before = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout
    objects = set(shm_objects())  # other daemons' (a session fixture's): not this run's
    run = subprocess.run([sys.executable, "-m", "enserve.loadtest.ab", "--model-repository", str(demo_repo),
                          "--before", "HEAD", "--serve-flags=--no-optimize", "--rounds", "1", "--seconds", "0.5",
                          "--cells", "2x1", "--arm", f"capped={demo_repo} --max-inflight 64"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|") for line in run.stdout.splitlines() if line.startswith("| c2 x 1 |")]
    assert [r[2].strip() for r in rows] == ["before", "now", "capped"], run.stdout
    for r in rows:
        assert float(r[3]) > 0 and float(r[5]) > 0 and float(r[6]) > 0 and r[8].strip() == "0", run.stdout
    assert subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout == before
    assert set(shm_objects()) <= objects
