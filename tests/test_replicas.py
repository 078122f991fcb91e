"""Replicas and worker groups against real daemons: answers equal the members' mean with 1, 2 and 3
replicas per member and with members sharing processes; a replica killed under load."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from enserve.optimizer import plan as plans
from tests.conftest import images, load, shm_objects, start_daemon

MEMBERS = ["cnn_w12", "cnn_w20", "cnn_w32", "cnn_w56"]


def write_plan(path, groups: list[tuple[list[str], int]], batch: int = 8) -> None:
    """A plan of worker groups (members, replicas), every replica on all cores with one thread."""
    cores = sorted(os.sched_getaffinity(0))
    plan_groups = [plans.PlanGroup(members, batch, [plans.PlanReplica("cpu:0", "cpu", cores, 1)] * replicas)
                   for members, replicas in groups]
    plans.save(plans.Plan("ensemble", "test", "test", "throughput", plan_groups, 0.0, 0.0, plan_groups, 0, 0.0), path)


def infer(client, model: str, x: np.ndarray):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp])


@pytest.mark.parametrize("layout", [
    [([m], 1) for m in MEMBERS],
    [([m], 2) for m in MEMBERS],
    [([m], 3) for m in MEMBERS],
    [(MEMBERS, 2)],  # every member in each of 2 processes, as Triton's python backend with 2 instances
    [(MEMBERS[:3], 1), (MEMBERS[3:], 2)],
], ids=["1-replica", "2-replicas", "3-replicas", "one-group-x2", "groups-3+1x2"])
def test_answers_equal_the_members_mean(demo_repo, reference, member_sessions, tmp_path, layout):
    write_plan(tmp_path / "plan.json", layout)
    daemon = start_daemon(demo_repo, tmp_path, "--plan", str(tmp_path / "plan.json"))
    try:
        workers = daemon.worker_pids()
        assert {g: len(p) for g, p in workers.items()} == {"+".join(m): r for m, r in layout}
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        for n in (1, 5, 19):  # 19 > the batch size 8: split across batches
            x = images(n, seed=n)
            result = infer(client, "ensemble", x)
            np.testing.assert_allclose(result.as_numpy("probs"), reference(x), atol=1e-5)
            outs = np.stack([s.run(None, {"input": x})[0] for s in member_sessions.values()])
            var = outs.var(axis=0).mean(axis=1, keepdims=True)
            np.testing.assert_allclose(result.as_numpy("member_variance"), var, atol=1e-5)
            for m in MEMBERS:  # each member alone, from a process it may share with others
                np.testing.assert_allclose(infer(client, m, x).as_numpy("probs"),
                                           member_sessions[m].run(None, {"input": x})[0], atol=1e-6)
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []


def test_a_killed_replica_retries_its_tasks_while_the_others_answer(demo_repo, reference, tmp_path):
    write_plan(tmp_path / "plan.json", [([m], 2) for m in MEMBERS[:3]] + [([MEMBERS[3]], 3)])
    daemon = start_daemon(demo_repo, tmp_path, "--plan", str(tmp_path / "plan.json"))
    try:
        results: dict[str, int] = {}
        threads = load(daemon, reference, 5.0, results)
        time.sleep(1.5)
        before = daemon.worker_pids()
        victim, *others = before["cnn_w56"]
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.3)
        alive = daemon.worker_pids()["cnn_w56"]
        assert set(others) <= set(alive)  # the other replicas were not touched
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert results.get("wrong", 0) == 0, results
        # a killed replica's tasks are computed again by the others: no request fails
        assert set(results) == {"ok"} and results["ok"] > 20, results
        after = daemon.worker_pids()["cnn_w56"]
        assert len(after) == 3 and victim not in after  # restarted
        assert "exited with code -9; restarting it" in daemon.log.read_text()
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []
