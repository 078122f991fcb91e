"""Per-member profiles: memory footprint and seconds per batch, measured in a child process.

A profile is measured once per (model file hash, hardware, device key) and cached in a
versioned JSON file. Run as ``python -m enserve.optimizer.profiles '<json request>'`` for one measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enserve.child import python_module
from enserve.optimizer.allocation import Device, MemberProfile, cpu_key
from enserve.optimizer.sessions import session_for

CACHE_VERSION = 1
DEFAULT_BATCH_SIZES = (1, 8, 32, 64)


@dataclass(frozen=True)
class MemberSource:
    """What the profiler needs of a member (plain data: the optimizer does not read repositories)."""

    name: str
    path: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # name, numpy dtype, dims after the batch axis


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _measure_here(request: dict) -> dict:
    """Runs in the child: load the session on the device, time each batch size, report memory."""

    if request.get("cores"):
        os.sched_setaffinity(0, request["cores"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    session = session_for(request["path"], threads=request["threads"],
                          device="gpu" if request["kind"] == "gpu" else "cpu")
    rng = np.random.default_rng(0)
    latency = {}
    for b in sorted(request["batch_sizes"]):
        feed = {n: rng.random((b, *dims)).astype(np.dtype(dt)) for n, dt, dims in request["inputs"]}
        session.run(None, feed)
        times = []
        end = time.perf_counter() + request["seconds"]
        while time.perf_counter() < end or len(times) < 3:
            t = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t)
        latency[b] = float(np.median(times))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"memory_bytes": max(1, after - before) * 1024, "latency_s": latency}


def _request(source: MemberSource, kind: str, threads: int, cores: tuple[int, ...] | None,
             batch_sizes, seconds: float) -> dict:
    return {"path": source.path, "inputs": [list(i) for i in source.inputs], "kind": kind,
            "threads": threads, "cores": list(cores) if cores else None,
            "batch_sizes": list(batch_sizes), "seconds": seconds}


def _child_command(*args: str) -> tuple[list[str], dict]:
    return python_module("enserve.optimizer.profiles", *args), dict(os.environ)


def _parse_result(line: str) -> dict:
    result = json.loads(line)
    result["latency_s"] = {int(b): s for b, s in result["latency_s"].items()}
    return result


def measure(source: MemberSource, *, kind: str, threads: int, cores: tuple[int, ...] | None,
            batch_sizes=DEFAULT_BATCH_SIZES, seconds: float = 0.25) -> dict:
    """One profile, measured in a fresh child process so training or serving does not disturb it."""
    command, env = _child_command(json.dumps(_request(source, kind, threads, cores, batch_sizes, seconds)))
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"profiling member '{source.name}' ({source.path}) failed: {out.stderr.strip()[-2000:]}")
    return _parse_result(out.stdout.strip().splitlines()[-1])


class Profiler:
    """A long-lived child process that measures one model after another (a search measures every
    trial: this saves the ~0.3 s of starting Python and ONNX Runtime each time). Context manager.
    It reports latencies only: a process's peak memory after several models says nothing of one."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        command, env = _child_command("--serve")
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env, bufsize=1)

    def __enter__(self) -> Profiler:
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:  # it is already gone
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stdout.close()
            self._proc.stderr.close()
            self._proc = None

    def measure(self, source: MemberSource, *, kind: str = "cpu", threads: int = 1,
                cores: tuple[int, ...] | None = None, batch_sizes=DEFAULT_BATCH_SIZES, seconds: float = 0.25) -> dict:
        """One profile; a child that died on an earlier model is started again first."""
        if self._proc is None:
            self._start()
        try:
            self._proc.stdin.write(json.dumps(_request(source, kind, threads, cores, batch_sizes, seconds)) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:  # it died before reading the request
            line = ""
        if not line:
            err = self._proc.stderr.read()[-2000:]
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
            self._proc = None
            raise RuntimeError(f"profiling member '{source.name}' ({source.path}) failed: the profiler exited: {err}")
        result = json.loads(line)
        if "error" in result:
            raise RuntimeError(f"profiling member '{source.name}' ({source.path}) failed: {result['error']}")
        return _parse_result(line)


def _serve() -> None:
    """The Profiler's child: one JSON request a line in, one JSON result (or error) a line out."""
    for line in sys.stdin:
        try:
            reply = _measure_here(json.loads(line))
            del reply["memory_bytes"]
        except Exception as exc:  # reported to the parent, which raises it with the member's name
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


def device_keys(devices: list[Device]) -> list[tuple[str, str, int, tuple[int, ...] | None]]:
    """The (key, kind, threads, cores) measurements the cost model needs for these devices."""
    keys = []
    max_cores = max([len(d.cores) for d in devices if d.kind == "cpu"], default=0)
    cpu = next((d for d in devices if d.kind == "cpu" and len(d.cores) == max_cores), None)
    for k in range(1, max_cores + 1):
        keys.append((cpu_key(k), "cpu", k, cpu.cores[:k] if cpu else None))
    if any(d.kind == "gpu" for d in devices):
        keys.append(("gpu", "gpu", 1, None))
    return keys


def load_cache(path: Path) -> dict:
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("version") == CACHE_VERSION:
            return data
    return {"version": CACHE_VERSION, "entries": {}}


def profile_members(
    sources: list[MemberSource],
    devices: list[Device],
    hardware: str,
    *,
    cache_path: Path | None = None,
    batch_sizes=DEFAULT_BATCH_SIZES,
    progress: Callable[[str], None] | None = None,
) -> list[MemberProfile]:
    """Profiles for every member on every device key; cached by model hash + hardware + key."""
    cache = load_cache(cache_path) if cache_path else {"version": CACHE_VERSION, "entries": {}}
    profiles = []
    for src in sources:
        digest = file_hash(src.path)
        latency: dict[str, dict[int, float]] = {}
        memory = 0
        for key, kind, threads, cores in device_keys(devices):
            entry_key = f"{digest}:{hardware}:{key}:{','.join(map(str, sorted(batch_sizes)))}"
            entry = cache["entries"].get(entry_key)
            if entry is None:
                if progress:
                    progress(f"profiling {src.name} on {key}")
                entry = measure(src, kind=kind, threads=threads, cores=cores, batch_sizes=batch_sizes)
                cache["entries"][entry_key] = entry
                if cache_path:
                    try:
                        cache_path.parent.mkdir(parents=True, exist_ok=True)
                        cache_path.write_text(json.dumps(cache, indent=1))
                    except OSError as exc:  # a read-only repository (a container's volume)
                        if progress:
                            progress(f"cannot keep the profiles in {cache_path} ({exc.strerror}): "
                                     "they are measured again at the next start")
                        cache_path = None
            latency[key] = {int(b): float(s) for b, s in entry["latency_s"].items()}
            memory = max(memory, int(entry["memory_bytes"]))
        profiles.append(MemberProfile(src.name, memory, latency))
    return profiles


def profiles_from_json(data: dict) -> list[MemberProfile]:
    """Profiles as ``enserve allocate --profiles`` reads them: ``{"version": CACHE_VERSION, "members":
    [{"name", "memory_bytes", "latency_s": {device key: {batch size: seconds}}}]}``."""
    if data.get("version") != CACHE_VERSION:
        raise ValueError(f"profile file version {data.get('version')!r}, but this enserve reads {CACHE_VERSION}")
    return [MemberProfile(m["name"], int(m["memory_bytes"]),
                          {k: {int(b): float(s) for b, s in t.items()} for k, t in m["latency_s"].items()})
            for m in data["members"]]


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
