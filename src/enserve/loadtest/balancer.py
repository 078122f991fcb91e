"""Several daemons behind HAProxy on this machine, configured by ``enserve deploy haproxy``: the
cluster the scale-out tests use, and a table of throughput, p99 and the balancer's CPU per request
with 1, 2, 3 ... daemons.

    python -m enserve.loadtest.balancer --model-repository /tmp/bench4 --daemons 1,2,3
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from enserve.deploy import Backend, BalancerPorts, HealthCheck, haproxy_config
from enserve.loadtest import launcher
from enserve.server.config import DEFAULT_MODEL_REPOSITORY
from enserve.server.served.repository import DEFAULT_ENSEMBLE


def haproxy_binary() -> str | None:
    """HAProxy on PATH, or where Debian puts it (/usr/sbin, not on a non-root PATH)."""
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


@dataclass
class Balancer:
    """An HAProxy process in the foreground, stopped by its pid."""

    proc: subprocess.Popen
    ports: BalancerPorts
    config: Path

    @classmethod
    def start(cls, backends: list[Backend], workdir: Path, check: HealthCheck | None = None) -> Balancer:
        binary = haproxy_binary()
        if binary is None:
            raise FileNotFoundError("haproxy is not installed (Debian: apt-get install haproxy)")
        ports = BalancerPorts(*launcher.free_ports(3))
        config = workdir / "haproxy.cfg"
        config.write_text(haproxy_config(backends, ports, check or HealthCheck()))
        log = (workdir / "haproxy.log").open("w")
        proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        return cls(proc, ports, config)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    def servers(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> status ('UP', 'DOWN', ...), from the stats page's CSV."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.stats}/stats;csv", timeout=2) as r:
            rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
            return {(row["pxname"], row["svname"]): row["status"] for row in rows
                    if row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_status(self, server: str, status: str, timeout: float = 30) -> float:
        """Until ``server`` (e.g. 'enserve0') is ``status`` in both backends; the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}: "
                                   f"{(self.config.parent / 'haproxy.log').read_text()[-2000:]}")
            try:
                states = [v for (_, s), v in self.servers().items() if s == server]
                if not states:
                    raise KeyError(f"haproxy has no server '{server}' (its servers: {sorted(self.servers())})")
                if all(v.startswith(status) for v in states):
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"haproxy: {server} not {status} after {timeout} s: {self.servers()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@dataclass
class Cluster:
    """``n`` daemons of one repository on free ports, and HAProxy in front of them."""

    repository: Path
    workdir: Path
    flags: tuple[str, ...] = ()
    daemons: list[launcher.Server] = field(default_factory=list)
    balancer: Balancer | None = None

    def start(self, n: int, check: HealthCheck | None = None) -> Cluster:
        try:
            for i in range(n):
                self.daemons.append(self.start_daemon(i, wait=False))
            for d in self.daemons:
                d.wait_ready()
            self.balancer = Balancer.start(self.backends(), self.workdir, check)
            for i in range(n):
                self.balancer.wait_status(f"enserve{i}", "UP")
        except BaseException:
            self.stop()
            raise
        return self

    def start_daemon(self, i: int, wait: bool = True, ports: tuple[int, int, int] | None = None) -> launcher.Server:
        log = self.workdir / f"daemon{i}-{time.monotonic_ns()}.log"
        return launcher.start_daemon(self.repository, *self.flags, log=log, wait=wait, ports=ports)

    def restart(self, i: int) -> launcher.Server:
        """Daemon ``i`` again, on its old ports (after it was killed)."""
        old = self.daemons[i]
        self.daemons[i] = self.start_daemon(i, ports=(old.http_port, old.grpc_port, old.metrics_port))
        return self.daemons[i]

    def backends(self) -> list[Backend]:
        return [Backend("127.0.0.1", d.http_port, d.grpc_port, d.metrics_port) for d in self.daemons]

    def stop(self) -> list[int]:
        """Stop the balancer, then every daemon by its pid; their exit codes."""
        if self.balancer is not None:
            self.balancer.stop()
        return [d.stop() for d in self.daemons]


def metric(daemon: launcher.Server, name: str, model: str = DEFAULT_ENSEMBLE) -> float:
    """One sample of ``name`` for ``model`` from the daemon's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'{name}{{') and f'model="{model}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from enserve.loadtest.bench import measure
    from enserve.loadtest.signature import signature

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    p.add_argument("--model", default=DEFAULT_ENSEMBLE)
    p.add_argument("--daemons", default="1,2,3", help="cluster sizes to measure")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--images", default="1,8", help="images per request")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--daemon-flags", default="",
                   help="flags of every daemon, e.g. '--no-optimize' (default: none; a daemon reuses the "
                        "repository's saved plan, or runs the allocator first)")
    args = p.parse_args(argv)
    sizes = [int(v) for v in args.daemons.split(",")]
    image_counts = [int(v) for v in args.images.split(",")]
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="enserve-lb-") as tmp:
            cluster = Cluster(args.model_repository, Path(tmp), tuple(shlex.split(args.daemon_flags))).start(n)
            try:
                sig = signature(cluster.daemons[0].grpc_url, args.model)
                for images in image_counts:
                    if n == sizes[0]:  # the same daemon without the balancer, in the same run
                        d = cluster.daemons[0]
                        cell = measure("direct", d.grpc_url, args.model, args.concurrency, images, args.seconds,
                                       sig, pid=d.pid)
                        rows.append(("direct, 1 daemon", images, cell, None))
                    cell = measure("haproxy", cluster.balancer.grpc_url, args.model, args.concurrency, images,
                                   args.seconds, sig, pid=cluster.balancer.pid)
                    rows.append((f"haproxy, {n} daemon(s)", images, cell, cell.front_cpu_s))
            finally:
                cluster.stop()
    print(f"\n{args.concurrency} clients over one gRPC channel, {args.seconds:g} s per cell, "
          f"{args.model_repository} {args.daemon_flags}; every daemon on this machine's {os.cpu_count()} cores")
    print("| path | images/req | req/s | img/s | p50 ms | p99 ms | errors | balancer CPU µs/req |")
    print("|---|---|---|---|---|---|---|---|")
    for name, images, cell, lb_cpu in rows:
        per_req = f"{lb_cpu / max(cell.requests, 1) * 1e6:.0f}" if lb_cpu is not None else "-"
        print(f"| {name} | {images} | {cell.requests / cell.seconds:.0f} | {cell.images_per_s:.0f} | "
              f"{cell.pct(50):.2f} | {cell.pct(99):.2f} | {cell.errors} | {per_req} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
