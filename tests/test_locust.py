"""Locust (headless, real processes) against a real daemon: the shipped users, gRPC and HTTP, get
answers equal to the mean of the server's own members, with no failure."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from tests.conftest import ROOT, shm_objects, start_daemon


def test_locust_users_get_right_answers(demo_repo, tmp_path):
    daemon = start_daemon(demo_repo, tmp_path)
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
