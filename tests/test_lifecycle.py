"""Faults and lifecycle against real daemons: worker SIGKILL, SIGTERM drain and SIGTERM during the
allocator, leftovers, load failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import posix_ipc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import copy_repo, images, load, shm_objects, start_daemon, timed_infer


def test_worker_sigkill_under_load(demo_repo, reference, tmp_path):
    daemon = start_daemon(demo_repo, tmp_path)
    try:
        results: dict[str, int] = {}
        threads = load(daemon, reference, 6.0, results)
        time.sleep(1.5)
        before = daemon.worker_pids()
        os.kill(before["cnn_w56"][0], signal.SIGKILL)
        time.sleep(1.5)
        os.kill(daemon.worker_pids()["cnn_w12"][0], signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert results.get("wrong", 0) == 0, results
        errors = {k: v for k, v in results.items() if k not in ("ok", "wrong")}
        assert all("died" in k for k in errors), errors  # a clear error, if any
        assert results["ok"] > 20, results
        after = daemon.worker_pids()
        assert after["cnn_w56"] != before["cnn_w56"] and set(after) == set(before)
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        x = images(3, seed=7)
        inp = grpcclient.InferInput("input", [3, 3, 32, 32], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("ensemble", [inp]).as_numpy("probs"), reference(x), atol=1e-5)
        assert client.is_server_ready()
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []


def test_sigterm_drains_in_flight_and_cleans_shm(demo_repo, reference, tmp_path):
    """Every request the server holds at SIGTERM is answered, and answered right; later ones may be refused."""
    daemon = start_daemon(demo_repo, tmp_path, "--max-adaptive-wait-us", "0")
    outcomes: list[tuple[float, float, str]] = []  # (sent, answered, outcome)
    lock = threading.Lock()

    def client_thread(i: int) -> None:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        x = images(32, seed=400 + i)  # ~100 ms per request with 6 clients: several in flight at any moment
        expected = reference(x)
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            outcome = timed_infer(client, x, expected)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    workers = daemon.worker_pids()
    assert shm_objects(daemon.pid)
    t_term = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    # a request's bytes may leave a busy client well after it started, so only those started long
    # before SIGTERM are surely at the server; the drain must answer the ones it holds, and answer them right
    early = {o for sent, _, o in outcomes if sent < t_term - 0.2}
    drained = [o for _, done, o in outcomes if done > t_term and o == "ok"]
    assert early == {"ok"}, sorted(early)
    assert drained, "no request in flight at SIGTERM was answered: the drain dropped them"
    refused = {o for *_, o in outcomes if o not in ("ok", "wrong")}
    assert all(o.startswith("StatusCode.UNAVAILABLE") for o in refused), refused  # later ones: refused
    assert not [o for *_, o in outcomes if o == "wrong"]
    assert shm_objects(daemon.pid) == []
    for pid in (p for pids in workers.values() for p in pids):
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


def test_leftovers_of_a_crashed_daemon_are_removed(demo_repo, tmp_path):
    dead_pid = 4_000_000  # above pid_max's default: no such process
    name = f"/enserve.{dead_pid}.in0.0"
    posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096).close_fd()
    daemon = start_daemon(demo_repo, tmp_path)
    try:
        assert not os.path.exists(f"/dev/shm{name}")
    finally:
        assert daemon.stop() == 0


def test_member_that_fails_to_load_is_named(demo_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(demo_repo, repo)
    bad = repo / "cnn_w20" / "1" / "model.onnx"
    bad.write_bytes(b"this is not an onnx file")
    daemon = start_daemon(repo, tmp_path, wait=False)
    assert daemon.proc.wait(90) != 0
    log = daemon.log.read_text()
    assert f"member 'cnn_w20' failed to load from {bad}" in log
    assert shm_objects(daemon.pid) == []


def test_gpu_placement_without_gpu_says_what_is_missing(demo_repo, tmp_path):
    daemon = start_daemon(demo_repo, tmp_path, "--device", "gpu:0", wait=False)
    assert daemon.proc.wait(90) != 0
    log = daemon.log.read_text()
    assert "placed on gpu:0, but onnxruntime offers only" in log and "onnxruntime-gpu" in log
    assert shm_objects(daemon.pid) == []


def test_members_are_pinned_to_their_cpu_cores(demo_repo, tmp_path):
    daemon = start_daemon(demo_repo, tmp_path, "--cpu-cores", "0", "--batch-size", "4")
    try:
        workers = daemon.worker_pids()
        assert len(workers) == 4 and all(len(pids) == 1 for pids in workers.values())
        for pid in (p for pids in workers.values() for p in pids):
            status = open(f"/proc/{pid}/status").read()
            assert "Cpus_allowed_list:\t0\n" in status
        cfg = grpcclient.InferenceServerClient(daemon.grpc_url).get_model_config("cnn_w12").config
        assert cfg.dynamic_batching.preferred_batch_size == [4]
    finally:
        assert daemon.stop() == 0


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        children = []
        for task in Path(f"/proc/{p}/task").glob("*"):  # every thread's children (the allocator's run in one)
            try:
                children += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
        out.update(children)
        todo.extend(children)
    return out


def test_sigterm_during_the_allocator_stops_cleanly(demo_repo, tmp_path):
    repo = copy_repo(demo_repo, tmp_path)  # no plan: the allocator runs
    daemon = start_daemon(repo, tmp_path, "--optimize-time", "120", wait=False, optimize=True)
    deadline = time.monotonic() + 120
    while "allocator: [1/" not in daemon.output() and time.monotonic() < deadline:
        assert daemon.proc.poll() is None, daemon.output()
        time.sleep(0.1)
    assert "allocator: [1/" in daemon.output(), "the allocator never measured"
    while not (children := descendants(daemon.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)  # the next measurement's workers
    assert children, "no worker of the allocator's measurement is running"
    t0 = time.monotonic()
    assert daemon.stop(30) == 0, daemon.output()
    assert time.monotonic() - t0 < 20
    assert "stopping during start-up" in daemon.output()
    alive = [p for p in children if Path(f"/proc/{p}").exists()]
    assert alive == [], alive
    assert shm_objects(daemon.pid) == []
    assert list((repo / ".enserve" / "plans").glob("*.json")) == []  # no half-made plan was saved


def test_shutdown_fits_its_timeout_even_with_a_hung_worker(demo_repo, tmp_path):
    """SIGSTOPped workers hold gRPC and HTTP requests; SIGTERM still ends everything within
    --shutdown-timeout: every caller gets a status (UNAVAILABLE / 503), not a closed connection (the
    requests are answered before the fronts close), the workers are killed, shared memory removed."""
    daemon = start_daemon(demo_repo, tmp_path, "--shutdown-timeout", "4", "--drain-timeout", "30")
    stopped = [p for pids in daemon.worker_pids().values() for p in pids]
    outcome: list[str] = []
    try:
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)

        def grpc_call() -> None:
            client = grpcclient.InferenceServerClient(daemon.grpc_url)
            inp = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
            inp.set_data_from_numpy(images(1))
            try:
                client.infer("ensemble", [inp], client_timeout=60)
                outcome.append("answered")
            except InferenceServerException as e:
                outcome.append(f"{e.status()}: {e.message()}")

        def http_call() -> None:
            x = images(1)
            body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                           "data": x.ravel().tolist()}]}).encode()
            try:
                urllib.request.urlopen(f"http://{daemon.http_url}/v2/models/ensemble/infer", body, timeout=60)
                outcome.append("answered")
            except urllib.error.HTTPError as e:
                outcome.append(f"HTTP {e.code}: {json.loads(e.read())['error']}")
            except Exception as e:  # noqa: BLE001 - a closed connection is what this test rules out
                outcome.append(f"{type(e).__name__}: {e}")

        callers = [threading.Thread(target=f) for f in (grpc_call, grpc_call, http_call, http_call)]
        for c in callers:
            c.start()
        time.sleep(0.5)
        assert all(c.is_alive() for c in callers)  # they wait on the stopped workers
        t0 = time.monotonic()
        assert daemon.stop(30) == 0, daemon.output()
        took = time.monotonic() - t0
        for c in callers:
            c.join(10)
    finally:
        for pid in stopped:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    assert took < 4 + 1, f"the stop took {took:.1f} s"
    assert not any(c.is_alive() for c in callers)
    assert sorted(o.split(":")[0] for o in outcome) == ["HTTP 503", "HTTP 503", "StatusCode.UNAVAILABLE",
                                                        "StatusCode.UNAVAILABLE"], outcome
    assert all("the server is shutting down" in o or "shut down before" in o for o in outcome), outcome
    for pid in stopped:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert shm_objects(daemon.pid) == []


def test_a_hung_worker_is_killed_restarted_and_its_request_answered(demo_repo, reference, tmp_path):
    daemon = start_daemon(demo_repo, tmp_path, "--worker-timeout", "1")
    try:
        stopped = daemon.worker_pids()["cnn_w56"][0]
        os.kill(stopped, signal.SIGSTOP)  # hangs without exiting: only a watchdog can notice
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        x = images(3, seed=55)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        t0 = time.monotonic()
        got = client.infer("ensemble", [inp], client_timeout=30).as_numpy("probs")
        took = time.monotonic() - t0
        np.testing.assert_allclose(got, reference(x), atol=1e-5)  # computed again by the restarted worker
        assert 1.0 <= took < 15, took
        assert "has not answered a task for" in daemon.output()
        assert not Path(f"/proc/{stopped}").exists() or "Z" in Path(f"/proc/{stopped}/stat").read_text().split()[2]
        assert daemon.worker_pids()["cnn_w56"] != [stopped]
        assert client.is_model_ready("ensemble")
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []


def test_expired_requests_free_their_in_flight_slots_at_once(demo_repo, reference, tmp_path):
    """A stopped worker (the watchdog far away) holds every request: each expires and frees its
    in-flight slot at once, so the next is not refused; its rows stay held by its tasks. Once the
    worker runs again it skips the expired tasks, their rows come back, and new answers are right."""
    daemon = start_daemon(demo_repo, tmp_path, "--worker-timeout", "120", "--request-timeout", "0.4",
                          "--max-inflight", "2")
    try:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        stopped = daemon.worker_pids()["cnn_w56"][0]
        os.kill(stopped, signal.SIGSTOP)
        try:
            for i in range(6):  # three times the in-flight limit
                x = images(8, seed=70 + i)
                inp = grpcclient.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                with pytest.raises(InferenceServerException, match="did not finish within 0.4 s") as e:
                    client.infer("ensemble", [inp], client_timeout=30)
                assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        finally:
            os.kill(stopped, signal.SIGCONT)
        for i in range(4):  # the worker first skips the six expired tasks
            x = images(8, seed=90 + i)
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            np.testing.assert_allclose(client.infer("ensemble", [inp], client_timeout=30).as_numpy("probs"),
                                       reference(x), atol=1e-5)
        assert daemon.worker_pids()["cnn_w56"] == [stopped]  # not restarted: it only waited
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_drains_without_restarting_workers(demo_repo, reference, tmp_path, sig):
    """Ctrl-C in a terminal signals the daemon and its workers at once: the workers leave their
    stop to the daemon, so requests in flight finish and nothing is restarted."""
    daemon = start_daemon(demo_repo, tmp_path, session=True)
    results: dict[str, int] = {}
    threads = load(daemon, reference, 2.0, results, n_threads=4)
    time.sleep(1.0)
    workers_before = daemon.worker_pids()
    os.killpg(os.getpgid(daemon.pid), sig)
    assert daemon.proc.wait(30) == 0, daemon.output()
    for t in threads:
        t.join()
    assert results.get("ok", 0) > 0 and results.get("wrong", 0) == 0, results
    failed = {k: v for k, v in results.items() if k not in ("ok", "wrong")}
    assert all("UNAVAILABLE" in k for k in failed), failed  # only those sent after the stop began
    assert "restarting it" not in daemon.output() and "exited with code" not in daemon.output()
    assert all(not Path(f"/proc/{p}").exists() for pids in workers_before.values() for p in pids)
    assert shm_objects(daemon.pid) == []


def test_readiness_says_so_while_a_member_restarts(demo_repo, tmp_path):
    daemon = start_daemon(demo_repo, tmp_path)
    try:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        assert client.is_server_ready() and client.is_model_ready("ensemble")
        os.kill(daemon.worker_pids()["cnn_w56"][0], signal.SIGKILL)
        seen: set[tuple[bool, bool, bool]] = set()
        reasons: set[str] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = (client.is_server_ready(), client.is_model_ready("ensemble"), client.is_model_ready("cnn_w12"))
            seen.add(state)
            if not state[1]:
                reasons |= {m.reason for m in client.get_model_repository_index().models if m.name == "ensemble"}
            if state == (True, True, True) and len(seen) > 1:
                break
            time.sleep(0.01)
        assert (False, False, True) in seen, seen  # the ensemble (and so the server) waits; cnn_w12 does not
        assert any("cnn_w56 is restarting" in r for r in reasons), reasons
        assert state == (True, True, True), "not ready again after the restart"
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []


def test_a_restart_that_fails_marks_the_member_down_and_retries_with_back_off(demo_repo, reference, tmp_path):
    repo = copy_repo(demo_repo, tmp_path)
    daemon = start_daemon(repo, tmp_path)
    try:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        (repo / "cnn_w56" / "1" / "model.onnx").unlink()  # its next start cannot load it
        os.kill(daemon.worker_pids()["cnn_w56"][0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while client.is_model_ready("cnn_w56") or "cnn_w56" in daemon.worker_pids():
            assert time.monotonic() < deadline, daemon.output()
            time.sleep(0.05)
        x = images(1)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException, match="cnn_w56.*model.onnx") as down:
            client.infer("ensemble", [inp], client_timeout=30)
        assert down.value.status() == "StatusCode.UNAVAILABLE"
        assert not client.is_model_ready("ensemble") and not client.is_server_ready()
        assert client.infer("cnn_w12", [inp]).as_numpy("probs").shape == (1, 10)  # the others still serve
        assert "retrying in" in down.value.message()
        shutil.copy(demo_repo / "cnn_w56" / "1" / "model.onnx", repo / "cnn_w56" / "1" / "model.onnx")
        while not client.is_model_ready("ensemble"):  # the back-off's next try loads it again
            assert time.monotonic() < deadline + 30, daemon.output()
            time.sleep(0.1)
        np.testing.assert_allclose(client.infer("ensemble", [inp], client_timeout=30).as_numpy("probs"),
                                   reference(x), atol=1e-5)
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []
