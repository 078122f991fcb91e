"""Fixtures: a demo repository and a real daemon in its own process, stopped by pid."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from enserve.server import launcher

ROOT = Path(__file__).resolve().parent.parent


def shm_objects(pid: int) -> list[str]:
    return launcher.shm_objects(pid)


Daemon = launcher.Server


def start_daemon(repo: Path, tmp: Path, *extra: str, wait: bool = True, timeout: float = 90,
                 optimize: bool = False) -> Daemon:
    """A daemon on free ports, its output in ``tmp``; the allocator off unless ``optimize``."""
    log = tmp / f"daemon-{time.monotonic_ns()}.log"
    return launcher.start_daemon(repo, *([] if optimize else ["--no-optimize"]), *extra, log=log, wait=wait,
                                 timeout=timeout, cwd=ROOT)


def copy_repo(repo: Path, tmp: Path) -> Path:
    """A copy of ``repo`` to change, without its saved plans and profiles."""
    copy = tmp / "repo"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".enserve"))
    return copy


def wait_ready(daemon: Daemon, timeout: float = 90) -> None:
    daemon.wait_ready(timeout)


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory) -> Path:
    from enserve.models.demo import write_demo_repository

    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    write_demo_repository(repo)
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
