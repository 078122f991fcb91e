"""Fixtures: a demo repository and a real daemon in its own process, stopped by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def shm_objects(pid: int) -> list[str]:
    return [p for p in os.listdir("/dev/shm") if p.startswith(f"enserve.{pid}.")]


@dataclass
class Daemon:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def worker_pids(self) -> dict[str, list[int]]:
        """Worker group ('a+b' when members share processes) -> replica pids, from the daemon's
        children (their command lines)."""
        from enserve.loadtest.soak import workers

        return workers(self.pid)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_daemon(repo: Path, tmp: Path, *extra: str, wait: bool = True, timeout: float = 90,
                 optimize: bool = False) -> Daemon:
    http, grpc_port, metrics = free_ports(3)
    log = tmp / f"daemon-{grpc_port}.log"
    cmd = [sys.executable, "-m", "enserve", "serve", "--model-repository", str(repo), *([] if optimize else ["--no-optimize"]),
           "--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics), *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    daemon = Daemon(proc, http, grpc_port, metrics, log)
    if wait:
        wait_ready(daemon, timeout)
    return daemon


def wait_ready(daemon: Daemon, timeout: float = 90) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log.read_text()}")
        try:
            if client.is_server_ready():
                return
        except Exception:
            pass
        time.sleep(0.1)
    daemon.stop()
    raise RuntimeError(f"daemon not ready after {timeout} s:\n{daemon.log.read_text()}")


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory) -> Path:
    from enserve.cli import init_demo

    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    init_demo(repo)
    return repo


@pytest.fixture(scope="session")
def member_sessions(demo_repo):
    """Every member run directly with ONNX Runtime: the independent reference."""
    paths = sorted(demo_repo.glob("cnn_*/1/model.onnx"))
    return {p.parent.parent.name: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in paths}


@pytest.fixture(scope="session")
def reference(member_sessions):
    def mean_of_members(x: np.ndarray) -> np.ndarray:
        return np.mean([s.run(None, {"input": x})[0] for s in member_sessions.values()], axis=0)

    return mean_of_members


@pytest.fixture(scope="module", params=["native", "grpcio"])
def daemon(request, demo_repo, tmp_path_factory):
    """The demo ensemble served with client shared memory on, once per gRPC transport."""
    d = start_daemon(demo_repo, tmp_path_factory.mktemp("daemon"), "--allow-client-shm",
                     "--grpc-transport", request.param)
    yield d
    code = d.stop()
    assert code == 0, d.log.read_text()
    assert shm_objects(d.pid) == []


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)
