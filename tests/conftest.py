"""Fixtures: a demo repository and a real daemon in its own process, stopped by pid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import venv
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from enserve.loadtest import launcher

ROOT = Path(__file__).resolve().parent.parent


def shm_objects(pid: int) -> list[str]:
    return launcher.shm_objects(pid)


Daemon = launcher.Server


def start_daemon(repo: Path, tmp: Path, *extra: str, wait: bool = True, timeout: float = 90,
                 optimize: bool = False, wrap: list[str] | None = None, session: bool = False) -> Daemon:
    """A daemon on free ports, its output in ``tmp``; the allocator off unless ``optimize``."""
    log = tmp / f"daemon-{time.monotonic_ns()}.log"
    return launcher.start_daemon(repo, *([] if optimize else ["--no-optimize"]), *extra, log=log, wait=wait,
                                 timeout=timeout, cwd=ROOT, wrap=wrap, session=session)


def copy_repo(repo: Path, tmp: Path) -> Path:
    """A copy of ``repo`` to change, without its saved plans and profiles."""
    copy = tmp / "repo"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".enserve"))
    return copy


def install_plainly(source: Path, tmp: Path) -> Path:
    """``pip install .`` of ``source`` (a folder with pyproject.toml, README.md and src/) into a fresh
    venv in ``tmp/venv``, not editable, as users install it; its interpreter. The dependencies come
    from this test environment's site-packages (appended to the new venv's path: the installed
    ``enserve`` comes first), so that nothing is downloaded."""
    build = tmp / "build-source"  # a copy, so that the build leaves nothing in ``source``
    build.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(source / name, build / name)
    shutil.copytree(source / "src", build / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(build)], check=True, timeout=300, capture_output=True)
    fresh = tmp / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(next(wheels.glob("enserve-*.whl")))], check=True, timeout=300, capture_output=True)
    site = next((fresh / "lib").glob("python3*/site-packages"))
    (site / "zz-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def wait_ready(daemon: Daemon, timeout: float = 90) -> None:
    daemon.wait_ready(timeout)


@pytest.fixture(scope="session", autouse=True)
def no_socket_left():
    """The tests SIGKILL daemons on purpose (an OOM kill, a failover); a later daemon would remove
    their socket folders only once a minute old: at the end the suite removes them itself."""
    yield
    from enserve.server.frontends.native_front import remove_dead_sockets

    remove_dead_sockets(older_than_s=0.0)


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory) -> Path:
    from enserve.models.demo import write_demo_repository

    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    write_demo_repository(repo)
    return repo


@pytest.fixture(scope="session")
def renamed_repo(tmp_path_factory) -> Path:
    """An ensemble imported with ``enserve import`` from ONNX files whose tensors have other names
    than the demo's ('pixels' in, 'probabilities' out), as a user's own models have."""
    import onnx

    from enserve.models.synthetic import write_tiny_cnns

    tmp = tmp_path_factory.mktemp("renamed")
    files = write_tiny_cnns(tmp / "onnx", (8, 16, 24))
    rename = {"input": "pixels", "probs": "probabilities"}
    for f in files:
        model = onnx.load(str(f))
        for value in [*model.graph.input, *model.graph.output]:
            value.name = rename.get(value.name, value.name)
        for node in model.graph.node:
            node.input[:] = [rename.get(n, n) for n in node.input]
            node.output[:] = [rename.get(n, n) for n in node.output]
        onnx.save(model, str(f))
    repo = tmp / "repo"
    done = subprocess.run([sys.executable, "-m", "enserve", "import", *map(str, files), "--model-repository",
                           str(repo)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
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


def timed_infer(client, x: np.ndarray, expected: np.ndarray, model: str = "ensemble") -> tuple[float, float, str]:
    """One gRPC request: (sent, answered) on the monotonic clock, and 'ok', 'wrong' or the error."""
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    t0 = time.monotonic()
    try:
        got = client.infer(model, [inp], client_timeout=30).as_numpy("probs")
        outcome = "ok" if np.allclose(got, expected, atol=1e-5) else "wrong"
    except InferenceServerException as e:
        outcome = f"{e.status()}: {e.message()}"
    return t0, time.monotonic(), outcome


def load(daemon, reference, seconds: float, results: dict, n_threads: int = 8,
         model: str = "ensemble", n_images: int | None = None) -> list[threading.Thread]:
    """Client threads sending distinct requests to ``model`` (1-4 images, or ``n_images``; answers
    checked against ``reference``); each outcome is recorded as ok / error text / wrong."""
    lock = threading.Lock()

    def run(i: int) -> None:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        x = images(n_images or 1 + i % 4, seed=300 + i)
        expected = reference(x)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            try:
                got = client.infer(model, [inp], client_timeout=30).as_numpy("probs")
                key = "ok" if np.allclose(got, expected, atol=1e-5) else "wrong"
            except InferenceServerException as e:
                key = f"{e.status()}: {e.message()}"
            with lock:
                results[key] = results.get(key, 0) + 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    return threads


def apt_install(package: str, binary: str) -> str | None:
    """``binary`` on PATH, installing Debian's ``package`` first when it is missing (as .ci/run does)."""
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "--no-install-recommends", package], ["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", package]):
        subprocess.run(command, capture_output=True, timeout=600, env=env)
        found = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
        if found:
            return found
    return None


def build(dataset, library, *, progress=None, on_schedule=None, **options) -> str:
    """``build_library`` with the options as keywords (``BuildOptions``'s fields); the storage used."""
    from enserve.tuning.options import BuildOptions
    from enserve.tuning.search import build_library

    return build_library(BuildOptions(dataset=str(dataset), library=Path(library), **options), progress=progress,
                         on_schedule=on_schedule)
