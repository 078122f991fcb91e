"""The allocator with the real bench on two CPU devices, and the daemon applying its plan."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from enserve.optimizer import plan as plans
from tests.conftest import ROOT, images, start_daemon


def profiles_to_json(profiles) -> dict:
    """The profiles file ``enserve allocate --profiles`` reads, written from its documented form."""
    from enserve.optimizer.profiles import CACHE_VERSION

    return {"version": CACHE_VERSION, "members": [
        {"name": p.name, "memory_bytes": p.memory_bytes,
         "latency_s": {k: {str(b): s for b, s in t.items()} for k, t in p.latency_s.items()}} for p in profiles]}


def test_allocate_on_two_cpu_devices_then_serve_the_plan(demo_repo, reference, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(demo_repo, repo)
    out = subprocess.run(
        [sys.executable, "-m", "enserve", "allocate", "--model-repository", str(repo), "--cpu-devices", "0;1",
         "--max-combi", "3", "--batch-sizes", "8,32"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    assert "profiling cnn_w56 on cpu1" in out.stdout
    assert "[3/3]" in out.stdout and "[4/3]" not in out.stdout  # the search stops at max_combi

    saved = list((repo / ".enserve" / "plans").glob("ensemble.*.json"))
    assert len(saved) == 1
    plan = plans.load(saved[0])
    # 3 scored by the search, plus 2 to confirm a refined allocation against the start
    assert plan.evaluated in (3, 5) and plan.score >= plan.start_score > 0
    replicas = [r for g in plan.groups for r in g.replicas]
    assert {r.device for r in replicas} <= {"cpu:0", "cpu:1"}
    assert all(r.cores == [int(r.device[-1])] and r.threads == 1 for r in replicas)
    assert all(g.batch_size in (8, 32) for g in plan.groups)
    assert sorted(m for g in plan.groups for m in g.members) == ["cnn_w12", "cnn_w20", "cnn_w32", "cnn_w56"]
    # the better of two starts: worst-fit decreasing, which spreads the members over both devices,
    # or every member in one group replicated on the largest device
    spread = len(plan.start) == 4 and {r.device for g in plan.start for r in g.replicas} == {"cpu:0", "cpu:1"}
    whole = len(plan.start) == 1 and len(plan.start[0].members) == 4
    assert spread or whole, plan.start

    for extra, optimize in ((["--plan", str(saved[0])], False), (["--cpu-devices", "0;1"], True)):
        daemon = start_daemon(repo, tmp_path, *extra, optimize=optimize)
        try:
            workers = daemon.worker_pids()
            for g in plan.groups:  # each replica pinned to its device's core
                pids = workers["+".join(g.members)]
                pinned = sorted(open(f"/proc/{pid}/status").read().split("Cpus_allowed_list:\t")[1].split()[0]
                                for pid in pids)
                assert pinned == sorted(str(r.cores[0]) for r in g.replicas)
            client = grpcclient.InferenceServerClient(daemon.grpc_url)
            first = plan.groups[0]
            cfg = client.get_model_config(first.members[0]).config
            assert list(cfg.dynamic_batching.preferred_batch_size) == [first.batch_size]
            assert sum(group.count for group in cfg.instance_group) == len(first.replicas)
            x = images(4, seed=11)
            inp = grpcclient.InferInput("input", [4, 3, 32, 32], "FP32")
            inp.set_data_from_numpy(x)
            np.testing.assert_allclose(client.infer("ensemble", [inp]).as_numpy("probs"), reference(x), atol=1e-5)
        finally:
            assert daemon.stop() == 0
        if optimize:
            assert "reusing the plan for this ensemble and hardware" in daemon.log.read_text()


def test_allocate_reports_an_impossible_fit(demo_repo, tmp_path):
    import json

    from enserve.optimizer.allocation import MemberProfile

    huge = [MemberProfile(n, 2**50, {"cpu1": {1: 0.001}}) for n in ("cnn_w12", "cnn_w20", "cnn_w32", "cnn_w56")]
    prof = tmp_path / "profiles.json"
    prof.write_text(json.dumps(profiles_to_json(huge)))
    out = subprocess.run(
        [sys.executable, "-m", "enserve", "allocate", "--model-repository", str(demo_repo), "--cpu-devices", "0",
         "--profiles", str(prof), "--bench", "cost"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert out.returncode == 1  # a failure while working, not a bad flag
    assert "member 'cnn_w12' needs 1073741824.0 MiB, but the most free memory" in out.stderr


def test_a_long_lived_profiler_measures_model_after_model_and_reports_a_bad_one(demo_repo, tmp_path):
    import os
    import signal

    import pytest

    from enserve.optimizer.profiles import MemberSource, Profiler

    files = sorted(demo_repo.glob("*/1/model.onnx"))[:2]
    sources = [MemberSource(f.parent.parent.name, str(f), (("input", "<f4", (3, 32, 32)),)) for f in files]
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with Profiler() as profiler:
        pid = profiler._proc.pid
        first = profiler.measure(sources[0], batch_sizes=(1, 8), seconds=0.05)
        with pytest.raises(RuntimeError, match=r"profiling member 'broken' .*broken.onnx.* failed: "):
            profiler.measure(MemberSource("broken", str(bad), sources[0].inputs), seconds=0.05)
        second = profiler.measure(sources[1], batch_sizes=(8,), seconds=0.05)  # the same child, still serving
        assert profiler._proc.pid == pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="failed: the profiler exited"):
            profiler.measure(sources[0], batch_sizes=(8,), seconds=0.05)
        third = profiler.measure(sources[0], batch_sizes=(8,), seconds=0.05)  # a new child
        new_pid = profiler._proc.pid
    assert new_pid != pid
    assert set(first["latency_s"]) == {1, 8} and set(second["latency_s"]) == set(third["latency_s"]) == {8}
    assert all(s > 0 for s in [*first["latency_s"].values(), *second["latency_s"].values()])
    for p in (pid, new_pid):
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)  # both children are gone (and reaped)


def test_confirming_keeps_the_start_unless_the_refined_plan_wins_by_the_margin():
    from enserve.optimizer.search import SearchResult
    from enserve.server.allocate import confirm_against_start

    start, refined = "start", "refined"  # allocations are opaque to the confirmation
    again = {start: 100.0, refined: 101.0}
    result = SearchResult(start, 100.0, refined, 104.0, 10)
    confirm_against_start(result, again.__getitem__, None, margin=0.03)  # 102.5 < 100 * 1.03
    assert (result.best, result.best_score, result.start_score, result.evaluated) == (start, 100.0, 100.0, 12)
    result = SearchResult(start, 100.0, refined, 104.0, 10)
    confirm_against_start(result, again.__getitem__, None, margin=0.0)  # no margin: 102.5 > 100
    assert (result.best, result.best_score) == (refined, 102.5)
    result = SearchResult(start, 100.0, refined, 110.0, 10)
    confirm_against_start(result, {start: 98.0, refined: 108.0}.__getitem__, None, margin=0.03)
    assert (result.best, result.best_score, result.start_score) == (refined, 109.0, 99.0)


def test_allocate_for_simulated_gpus_searches_with_the_cost_budget_and_prints_improvements(demo_repo, tmp_path):
    import json

    from enserve.optimizer.allocation import MemberProfile
    from enserve.optimizer.search import COST_MAX_COMBI, REAL_MAX_COMBI

    per_image = {"cnn_w12": 1e-4, "cnn_w20": 2e-4, "cnn_w32": 4e-4, "cnn_w56": 1e-3}  # one core, seconds
    batches = (1, 8, 32, 64)
    profiles = [MemberProfile(n, 2**20, {"cpu1": {b: s * b for b in batches},
                                         "gpu": {b: 2e-4 + s * b / 30 for b in batches}})
                for n, s in per_image.items()]
    prof = tmp_path / "profiles.json"
    prof.write_text(json.dumps(profiles_to_json(profiles)))
    out = subprocess.run(
        [sys.executable, "-m", "enserve", "allocate", "--model-repository", str(demo_repo), "--cpu-devices", "0",
         "--profiles", str(prof), "--simulate-gpus", "2", "--output", str(tmp_path / "plan.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    plan = plans.load(tmp_path / "plan.json")
    assert plan.evaluated > REAL_MAX_COMBI  # the cost model's budget, not the real bench's
    assert any(r.device.startswith("gpu") for g in plan.groups for r in g.replicas)
    progress = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert progress and all(f"/{COST_MAX_COMBI}]" in line for line in progress)
    assert len(progress) < plan.evaluated  # only the improvements are printed
    bests = [float(line.rsplit("(best ", 1)[1].rstrip(")")) for line in progress]
    assert bests == sorted(bests) and bests[-1] == pytest.approx(plan.score, abs=0.05)
