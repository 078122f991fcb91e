"""Locust (headless, real processes) against a real daemon: the shipped users, gRPC and HTTP, get
answers equal to the mean of the server's own members, with no failure, for the demo and for an
imported ensemble whose tensors have other names; and the soak, which cannot pass empty."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shm_objects, start_daemon

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the soak mounts a tmpfs as the container's /dev/shm (root)")


def soak(tmp_path, repo, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "enserve.loadtest.soak", "--model-repository", str(repo),
                           "--out", str(tmp_path / "soak"), *flags], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


@needs_root
def test_a_short_soak_with_faults_against_an_imported_ensemble(renamed_repo, tmp_path):
    """Its users speak the model's own tensor names: every fault window has traffic, answers are
    right. Before, every user died on 'probs' and the soak reported no failures and exited 0."""
    done = soak(tmp_path, renamed_repo, "--minutes", "0.4", "--fault-every", "6", "--faults", "kill-worker,stop-worker",
                "--stop-for", "2", "--users", "4", "--images", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "wrong answers: 0" in done.stdout and "soak FAILED" not in done.stdout
    injected = re.findall(r"^ +\d+ s  (kill worker|stop worker) ", done.stdout, re.M)
    assert sorted(injected) == ["kill worker", "stop worker"], done.stdout[-3000:]  # each kind, once
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "soak" / "soak_stats.csv"))}
    assert int(rows["Aggregated"]["Request Count"]) > 100, rows["Aggregated"]


@needs_root
def test_a_soak_whose_users_all_fail_exits_1_and_says_why(demo_repo, tmp_path):
    done = soak(tmp_path, demo_repo, "--minutes", "0.15", "--fault-every", "0", "--users", "2", "--model", "nope")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    assert "soak FAILED: Locust completed no requests: the users failed with" in done.stdout
    assert "unknown model 'nope'" in done.stdout


@pytest.mark.parametrize("which", ["demo_repo", "renamed_repo"])
def test_locust_users_get_right_answers(request, which, tmp_path):
    daemon = start_daemon(request.getfixturevalue(which), tmp_path)
    try:
        env = dict(os.environ, ENSERVE_GRPC_URL=daemon.grpc_url)
        out = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "src" / "enserve" / "loadtest" / "locustfile.py"), "--headless",
             "-u", "6", "-r", "6", "-t", "6s", "--host", f"http://{daemon.http_url}", "--csv", str(tmp_path / "l"),
             "--only-summary", "GrpcUser", "HttpJsonUser", "HttpBinaryUser"],
            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        with open(tmp_path / "l_stats.csv") as f:
            rows = {r["Name"]: r for r in csv.DictReader(f) if int(r["Request Count"]) > 0}
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []
    total = rows.pop("Aggregated")
    assert int(total["Request Count"]) > 50, (out.stdout[-2000:], out.stderr[-2000:])
    assert int(total["Failure Count"]) == 0, (rows, out.stderr[-3000:])
    assert set(rows) == {"ModelInfer", "infer json", "infer binary"}, rows  # every user ran
