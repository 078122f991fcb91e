"""Three daemons behind HAProxy on loopback, configured by ``enserve deploy haproxy``: answers through
the balancer, per-request spreading, failover under SIGKILL, and Prometheus over the cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from enserve.deploy import HealthCheck, prometheus_config
from enserve.loadtest import launcher
from enserve.loadtest.balancer import Cluster, haproxy_binary, metric
from tests.conftest import apt_install, images, timed_infer

CLIENTS = 16


@pytest.fixture(scope="module")
def cluster(demo_repo, tmp_path_factory):
    if apt_install("haproxy", "haproxy") is None or haproxy_binary() is None:
        pytest.skip("haproxy is not installed and apt-get could not install it (not root, or no package index)")
    c = Cluster(demo_repo, tmp_path_factory.mktemp("cluster"), ("--no-optimize",)).start(3)
    yield c
    pids = [d.pid for d in c.daemons]
    assert c.stop() == [0, 0, 0], [d.output() for d in c.daemons]
    assert all(launcher.shm_objects(pid) == [] for pid in pids)


def test_answers_through_the_balancer_equal_the_members_mean(cluster, reference):
    x = images(3, seed=11)
    expected = reference(x)
    g = grpcclient.InferenceServerClient(cluster.balancer.grpc_url)
    h = httpclient.InferenceServerClient(cluster.balancer.http_url)
    assert g.is_server_ready() and h.is_server_ready()
    for _ in range(6):  # every daemon answers at least once (round robin over 3)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(g.infer("ensemble", [inp]).as_numpy("probs"), expected, atol=1e-5)
        for binary in (True, False):
            hin = httpclient.InferInput("input", list(x.shape), "FP32")
            hin.set_data_from_numpy(x, binary_data=binary)
            np.testing.assert_allclose(h.infer("ensemble", [hin]).as_numpy("probs"), expected, atol=1e-5)


def _successes(cluster) -> list[float]:
    return [metric(d, "nv_inference_request_success") for d in cluster.daemons]


def test_one_connection_spreads_its_requests_over_every_daemon(cluster):
    x = images(1, seed=12)
    for protocol in (grpcclient, httpclient):
        client = protocol.InferenceServerClient(
            cluster.balancer.grpc_url if protocol is grpcclient else cluster.balancer.http_url)
        before = _successes(cluster)
        for _ in range(30):  # one client, one connection to the balancer
            inp = protocol.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer("ensemble", [inp])
        grown = [a - b for a, b in zip(_successes(cluster), before)]
        assert sum(grown) == 30 and min(grown) >= 5, (protocol.__name__, grown)


def _prometheus(config: str, workdir: Path):
    binary = apt_install("prometheus", "prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed and apt-get could not install it")
    (port,) = launcher.free_ports(1)
    (workdir / "prometheus.yml").write_text(config)
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _query(url: str, promql: str) -> float | None:
    with urllib.request.urlopen(f"{url}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=5) as r:
        result = json.loads(r.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_sums_throughput_and_p99_over_the_daemons(cluster, tmp_path):
    """The scrape configuration ``enserve deploy prometheus`` writes, run by a real Prometheus; the
    README's two queries over three daemons against what the client counted and timed."""
    stats = f"127.0.0.1:{cluster.balancer.ports.stats}"
    proc, url = _prometheus(prometheus_config(cluster.backends(), [stats], interval_s=1), tmp_path)
    try:
        deadline, targets = time.monotonic() + 30, []
        while time.monotonic() < deadline:  # every target scraped once
            try:
                with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=2) as r:
                    targets = json.loads(r.read())["data"]["activeTargets"]
                if len(targets) == 4 and all(t["health"] == "up" for t in targets):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"prometheus did not scrape the 3 daemons and the balancer: {targets}")
        x = images(2, seed=13)
        client = grpcclient.InferenceServerClient(cluster.balancer.grpc_url)
        latencies = []
        end = time.monotonic() + 4
        while time.monotonic() < end:
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            t0 = time.perf_counter()
            client.infer("ensemble", [inp])
            latencies.append(time.perf_counter() - t0)
        total = sum(metric(d, "nv_inference_count") for d in cluster.daemons)
        time.sleep(2.5)  # two more scrapes after the last request
        assert _query(url, 'sum(nv_inference_count{model="ensemble"})') == total
        assert _query(url, 'sum(rate(nv_inference_count{model="ensemble"}[1m]))') > 0
        p99 = _query(url, 'histogram_quantile(0.99, sum by (le) '
                          '(rate(enserve_request_duration_seconds_bucket{model="ensemble"}[1m])))')
        mean = sum(metric(d, "enserve_request_duration_seconds_sum") for d in cluster.daemons) / sum(
            metric(d, "enserve_request_duration_seconds_count") for d in cluster.daemons)
        # the server's p99 (arrival to answer) is below the client's; a bucket's interpolation at most
        # doubles it; and a p99 is not far below the mean
        assert mean / 2 <= p99 <= 2 * float(np.percentile(latencies, 99)), (mean, p99, latencies[-5:])
        requests = _query(url, 'sum(haproxy_backend_http_requests_total{proxy="enserve_grpc"})')
        assert requests is not None and requests >= len(latencies)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_sigkill_one_daemon_under_load_fails_few_requests_and_it_rejoins(cluster, reference):
    """16 clients through the balancer; SIGKILL a daemon. Failures are bounded by the requests in
    flight on it (one per client) and happen only within the health checks' detection window; no
    answer is wrong. Started again on its ports, it rejoins and takes traffic."""
    window = HealthCheck().detection_window_s()
    outcomes: list[tuple[float, float, str]] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(i: int) -> None:
        c = grpcclient.InferenceServerClient(cluster.balancer.grpc_url)
        x = images(1 + i % 4, seed=400 + i)  # 1-4 images: some requests fit HAProxy's replay buffer
        expected = reference(x)
        while not stop.is_set():
            outcome = timed_infer(c, x, expected)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        victim = cluster.daemons[2]
        workers = [p for pids in victim.worker_pids().values() for p in pids]
        t_kill = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait()
        down_after = cluster.balancer.wait_status("enserve2", "DOWN", timeout=window + 5)
        time.sleep(2)
        restarted = cluster.restart(2)
        assert launcher.shm_objects(victim.pid) == []  # the new daemon removed the dead one's objects
        assert not [p for p in workers if os.path.exists(f"/proc/{p}")]  # its workers followed it
        before = metric(restarted, "nv_inference_request_success")
        up_after = cluster.balancer.wait_status("enserve2", "UP", timeout=15)
        time.sleep(3)
        taken = metric(restarted, "nv_inference_request_success") - before
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failures = [(t0 - t_kill, t1 - t_kill, key) for t0, t1, key in outcomes if key != "ok"]
    ok = sum(key == "ok" for *_, key in outcomes)
    last = max((t1 for _, t1, _ in failures), default=0.0)
    print(f"\nfailover: {ok} ok, {len(failures)} failed (the last {last:.3f} s after the kill), "
          f"marked down after {down_after:.2f} s, "
          f"back up {up_after:.2f} s after its restart, then {taken:.0f} requests in 3 s: {failures}")
    assert not [f for f in failures if f[2] == "wrong"], failures
    assert len(failures) <= CLIENTS, failures
    assert all(0 <= t1 <= window + 1 for _, t1, _ in failures), failures
    assert taken >= 10, taken
