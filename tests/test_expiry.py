"""Requests that expire while their tasks wait at a worker, against a real daemon whose members
share one worker group (what the allocator picks on a CPU) with a long queue delay: a live answer
is never computed from an expired request's rows, expired work is skipped and bounded, and a
replica killed while it holds a share of a request does not double-count it."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import statistics
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import images, shm_objects, start_daemon
from tests.test_replicas import MEMBERS, write_plan

DELAY_US = 300_000  # a worker holds its first task up to 300 ms to fill a batch of 8


def shared_daemon(repo, tmp, replicas: int):
    """Every member in one worker group of ``replicas`` processes, batch 8, a 300 ms queue delay."""
    write_plan(tmp / "plan.json", [(MEMBERS, replicas)])
    return start_daemon(repo, tmp, "--plan", str(tmp / "plan.json"), "--max-queue-delay-us", str(DELAY_US))


@pytest.fixture(scope="module")
def shared_group(demo_repo, tmp_path_factory):
    daemon = shared_daemon(demo_repo, tmp_path_factory.mktemp("shared"), 1)
    yield daemon
    code = daemon.stop()
    assert code == 0, daemon.output()
    assert shm_objects(daemon.pid) == []


def _input(module, x: np.ndarray):
    inp = module.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def outcome(client, x: np.ndarray, expected: np.ndarray, **kw) -> str:
    """One gRPC request: 'ok', 'wrong', 'expired' (DEADLINE_EXCEEDED) or the error. A request with a
    short timeout that the worker finished before the event loop saw its deadline is answered, as
    Triton answers a request that reached execution in time: it must be right too."""
    try:
        got = client.infer("ensemble", [_input(grpcclient, x)], client_timeout=30, **kw).as_numpy("probs")
    except InferenceServerException as e:
        return "expired" if "DEADLINE_EXCEEDED" in e.status() else f"{e.status()}: {e.message()}"
    return "ok" if np.allclose(got, expected, atol=1e-5) else "wrong"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_after_one_that_expired_in_the_queue_is_answered_right(shared_group, reference, protocol):
    """A (Triton's ``timeout`` of 1 us) expires while its task waits at the worker; B, sent next,
    used to get A's rows too and was answered (m1 + 2 m2) / 2. Now every B equals the members' mean."""
    module = grpcclient if protocol == "grpc" else httpclient
    url = shared_group.grpc_url if protocol == "grpc" else shared_group.http_url
    client = module.InferenceServerClient(url)
    wrong, expired = [], 0
    for k in range(12):
        a, b = images(2, seed=100 + k), images(2, seed=200 + k)
        try:
            client.infer("ensemble", [_input(module, a)], timeout=1)
        except InferenceServerException as e:
            assert e.status() in ("StatusCode.DEADLINE_EXCEEDED", "504"), (e.status(), e.message())
            expired += 1
        got = client.infer("ensemble", [_input(module, b)]).as_numpy("probs")
        if not np.allclose(got, reference(b), atol=1e-5):
            wrong.append((k, float(got.sum(axis=1).max())))
    assert expired == 12
    assert wrong == [], f"{len(wrong)} of 12 answers after an expired request were wrong: {wrong}"


def clients(url: str, reference, load: list[tuple[np.ndarray, dict]], seconds: float,
            counts: dict[str, int]) -> list[threading.Thread]:
    """Started threads, one per (input, infer keywords): each sends that request over and over for
    ``seconds`` and counts its outcomes (``outcome``) in ``counts``, and requests with keywords (a
    timeout) also under 'flood'."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def run(x: np.ndarray, kw: dict) -> None:
        client = grpcclient.InferenceServerClient(url)
        expected = reference(x)
        while time.monotonic() < stop:
            key = outcome(client, x, expected, **kw)
            with lock:
                counts[key] = counts.get(key, 0) + 1
                if kw:
                    counts["flood"] = counts.get("flood", 0) + 1

    threads = [threading.Thread(target=run, args=(x, kw)) for x, kw in load]
    for t in threads:
        t.start()
    return threads


def test_live_answers_stay_right_beside_a_stream_of_expiring_requests(shared_group, reference):
    """Threads of live one-image requests (their batches fill at once) beside threads whose requests
    expire in 1 us: thousands of live answers, each equal to the members' mean."""
    counts: dict[str, int] = {}
    load = [(images(1, seed=i), {}) for i in range(8)] + [(images(3, seed=50 + i), {"timeout": 1}) for i in range(3)]
    threads = clients(shared_group.grpc_url, reference, load, 8.0, counts)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert set(counts) == {"ok", "expired", "flood"}, counts
    assert counts["ok"] >= 1000 and counts["expired"] >= 100, counts


def test_a_replica_killed_while_it_holds_a_share_of_a_request(demo_repo, reference, tmp_path):
    """A lone one-image request has its members dealt over both idle replicas; one is killed while
    its share waits out the queue delay. The share goes to the other replica, which already holds a
    share of the same rows: it runs after that one (never in the same batch, where the second share
    overwrote the first), and the answer is the members' mean."""
    shared_group = shared_daemon(demo_repo, tmp_path, 2)
    try:
        _kill_replicas_holding_shares(shared_group, reference)
    finally:
        code = shared_group.stop()
    assert code == 0, shared_group.output()
    assert shm_objects(shared_group.pid) == []


def _kill_replicas_holding_shares(shared_group, reference) -> None:
    client = grpcclient.InferenceServerClient(shared_group.grpc_url)
    exercised = 0  # rounds where the kill came while the shares waited: the retry path ran
    for k in range(4):
        shared_group.wait_ready(60)
        pids = sorted(p for ps in shared_group.worker_pids().values() for p in ps)
        assert len(pids) == 2
        x = images(1, seed=300 + k)
        answered: queue.Queue = queue.Queue()
        client.async_infer("ensemble", [_input(grpcclient, x)], lambda result, error, q=answered: q.put((result, error)))
        time.sleep(0.1)  # both shares wait in their workers (300 ms queue delay)
        os.kill(pids[k % 2], signal.SIGKILL)
        exercised += answered.empty()
        answer, error = answered.get(timeout=30)
        assert error is None, error
        np.testing.assert_allclose(answer.as_numpy("probs"), reference(x), atol=1e-5)
        deadline = time.monotonic() + 30
        while len([p for ps in shared_group.worker_pids().values() for p in ps]) < 2:
            assert time.monotonic() < deadline, "the killed replica was not restarted"
            time.sleep(0.1)
    assert exercised >= 2, f"only {exercised} of 4 kills came before the answer"
    assert shared_group.output().count("exited with code -9; restarting it") == 4


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _worker_tasks(daemon) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    return sum(int(float(v)) for v in re.findall(r"^enserve_worker_tasks\{[^}]*\} (\S+)$", text, re.M))


def test_a_flood_of_expiring_requests_is_skipped_and_bounded(demo_repo, reference, tmp_path):
    """4 clients send requests with a 1 ms timeout as fast as they can, beside 4 clients sending
    normal ones, on a shared worker group. The expired requests' tasks are skipped by the workers
    and do not pile up, the normal clients keep being answered (right), the watchdog kills no
    worker, and the event loop answers health checks promptly throughout."""
    write_plan(tmp_path / "plan.json", [(MEMBERS, 2)])
    daemon = start_daemon(demo_repo, tmp_path, "--plan", str(tmp_path / "plan.json"), "--worker-timeout", "3")
    try:
        pids = daemon.worker_pids()
        rss_before = _rss_mib(daemon.pid)
        seconds = 8.0
        stop = time.monotonic() + seconds
        counts: dict[str, int] = {}
        queued, health_ms, rss = [], [], []

        def watch() -> None:
            while time.monotonic() < stop:
                rss.append(_rss_mib(daemon.pid))
                t0 = time.monotonic()
                with urllib.request.urlopen(f"http://{daemon.http_url}/v2/health/live", timeout=10):
                    health_ms.append((time.monotonic() - t0) * 1000)
                queued.append(_worker_tasks(daemon))
                time.sleep(0.2)

        load = [(images(1 + i, seed=i), {}) for i in range(4)] + [(images(4, seed=10 + i), {"timeout": 1000})
                                                                  for i in range(4)]
        threads = clients(daemon.grpc_url, reference, load, seconds, counts)
        threads.append(threading.Thread(target=watch))
        threads[-1].start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a request hung"
        print(f"flood: {counts}, worker tasks max {max(queued)}, health p50 {statistics.median(health_ms):.1f} ms "
              f"max {max(health_ms):.1f} ms, daemon RSS {rss_before:.0f} MiB before, at most {max(rss):.0f} during")
        # memory is bounded: the daemon warms up (~70 MiB more, then flat: 40 s of this flood levelled
        # off at 140 MiB from the 6th second on); nothing accumulates per expired request
        assert max(rss) - rss_before < 128, rss
        assert set(counts) == {"ok", "expired", "flood"}, counts
        assert counts["expired"] >= 1000, counts
        assert counts["ok"] - (counts["flood"] - counts["expired"]) >= 100, counts  # normal ones; before: 16 in 10 s
        assert max(queued) < 1000, queued  # skipped as they come, not piled up
        assert statistics.median(health_ms) < 100, health_ms
        assert daemon.worker_pids() == pids  # the watchdog killed nothing
        assert "has not answered a task" not in daemon.output()
        deadline = time.monotonic() + 10
        while _worker_tasks(daemon) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _worker_tasks(daemon) == 0  # every task done or skipped, each of which let go of its rows
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()
    assert shm_objects(daemon.pid) == []


def test_a_stopped_worker_is_killed_even_when_every_request_to_it_expires(demo_repo, reference, tmp_path):
    """A worker stops answering (SIGSTOP) while its clients' deadlines (1 s) are shorter than
    --worker-timeout (3 s): every task it holds belongs to an expired request. The watchdog judges the
    worker by its silence, not by whose tasks it holds: it is killed, restarted, and serving resumes
    (counting only live requests' tasks, it was never killed, and its held rows filled the ring)."""
    write_plan(tmp_path / "plan.json", [(MEMBERS, 1)])
    daemon = start_daemon(demo_repo, tmp_path, "--plan", str(tmp_path / "plan.json"), "--worker-timeout", "3")
    try:
        (victim,) = [p for ps in daemon.worker_pids().values() for p in ps]
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        x = images(2, seed=77)
        expected = reference(x)
        os.kill(victim, signal.SIGSTOP)
        try:
            outcomes = {outcome(client, x, expected, timeout=1_000_000) for _ in range(3)}  # 1 s each
            assert outcomes == {"expired"}, outcomes
            deadline = time.monotonic() + 20
            while "has not answered a task" not in daemon.output():
                assert time.monotonic() < deadline, daemon.output()
                time.sleep(0.2)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        daemon.wait_ready(30)
        assert outcome(client, x, expected) == "ok"
        assert victim not in [p for ps in daemon.worker_pids().values() for p in ps]
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()
    assert shm_objects(daemon.pid) == []
