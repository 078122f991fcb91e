"""A KServe v2 server as a child process: start it, wait until it is ready, stop it by its pid, find
its workers. The one helper the tests, the benchmark, the soak and the Table 3 script share."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from enserve.child import python_module
from enserve.server.dataplane.shm import PREFIX
from enserve.server.dataplane.worker import WORKER_MODULE, WorkerSpec


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Server:
    proc: subprocess.Popen
    grpc_port: int
    http_port: int | None = None
    metrics_port: int | None = None
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def output(self) -> str:
        return self.log.read_text()[-5000:] if self.log is not None and self.log.exists() else ""

    def ready(self) -> bool:
        """Whether it says it is ready: on HTTP ``/v2/health/ready`` when its HTTP port is known (the
        probe Kubernetes and HAProxy use; open even when a token guards every gRPC call), else gRPC."""
        try:
            if self.http_port is not None:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=5) as r:
                    return r.status == 200
            import tritonclient.grpc as grpcclient

            return grpcclient.InferenceServerClient(self.grpc_url).is_server_ready()
        except Exception:  # not listening yet, not ready (HTTP 400), or refused
            return False

    def wait_ready(self, timeout: float = 120) -> None:
        """Until it says it is ready; raises (and stops it) if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server at {self.grpc_url} not ready after {timeout} s:\n{self.output()}")

    def stop(self, timeout: float = 30, *, pid: int | None = None, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (or ``sig``) by pid, as a container runtime does: to our child, or to ``pid`` (the
        daemon as PID 1 inside ``unshare -f``); SIGKILL after ``timeout`` (then raises)."""
        if self.proc.poll() is None:
            os.kill(pid or self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def worker_pids(self) -> dict[str, list[int]]:
        return workers(self.pid)


def start_server(command: list[str], grpc_port: int, *, http_port: int | None = None,
                 metrics_port: int | None = None, log: Path | None = None, wait: bool = True,
                 timeout: float = 120, cwd: Path | None = None, session: bool = False,
                 env: dict[str, str] | None = None) -> Server:
    """Run ``command`` (any KServe v2 gRPC server listening on ``grpc_port``); output to ``log``;
    ``session``: in a session (and process group) of its own, as a terminal's job is; ``env``:
    its environment (default: ours)."""
    out = log.open("w") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=session,
                            env=env)
    server = Server(proc, grpc_port, http_port, metrics_port, log)
    if wait:
        server.wait_ready(timeout)
    return server


def start_daemon(repository: Path, *flags: str, log: Path | None = None, wait: bool = True,
                 timeout: float = 120, cwd: Path | None = None, wrap: list[str] | None = None,
                 ports: tuple[int, int, int] | None = None, session: bool = False,
                 env: dict[str, str] | None = None) -> Server:
    """``enserve serve`` with ``flags`` on ``ports`` (HTTP, gRPC, metrics; default: free ones);
    ``wrap`` prefixes the command (``container_command``)."""
    http, grpc_port, metrics = ports or free_ports(3)
    command = [*(wrap or []), *python_module("enserve", "serve"), "--model-repository", str(repository),
               "--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics), *flags]
    return start_server(command, grpc_port, http_port=http, metrics_port=metrics, log=log, wait=wait,
                        timeout=timeout, cwd=cwd, session=session, env=env)


def mount_tmpfs(path: Path, mib: int) -> None:
    """A tmpfs of ``mib`` MiB on ``path`` (root only): a container's /dev/shm that outlives its daemon,
    as a pod's memory-medium emptyDir does. ``umount -l`` it when done."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs on {path} (root only): {done.stderr.strip()}")


def container_command(shm: Path, pid_namespace: bool = False) -> list[str]:
    """A command prefix running as in a container: ``shm`` bound on /dev/shm in a private mount
    namespace, and with ``pid_namespace`` as PID 1 of a new pid namespace (``unshare -f``)."""
    ns = ["-p", "-f", "--mount-proc"] if pid_namespace else []
    return ["unshare", "-m", "--propagation", "private", *ns,
            "sh", "-c", 'mount --bind "$0" /dev/shm && exec "$@"', str(shm)]


def namespace_pid1(unshare_pid: int, timeout: float = 10) -> int:
    """The host pid of the process that ``unshare -f`` (pid ``unshare_pid``) started as PID 1."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
        if children:
            inner = int(children[0])
            ns_pids = [line.split()[1:] for line in Path(f"/proc/{inner}/status").read_text().splitlines()
                       if line.startswith("NSpid:")]
            if not ns_pids or ns_pids[0][-1] != "1":
                raise RuntimeError(f"process {inner} is not PID 1 of its namespace: NSpid {ns_pids}")
            return inner
        time.sleep(0.05)
    raise RuntimeError(f"unshare (pid {unshare_pid}) started no process in {timeout} s")


def workers(daemon_pid: int) -> dict[str, list[int]]:
    """Worker group ('a+b' for members sharing processes) -> pids of its replicas, from the
    daemon's children's command lines."""
    out: dict[str, list[int]] = {}
    children: list[str] = []
    for task in Path(f"/proc/{daemon_pid}/task").glob("*"):  # children of every thread
        try:
            children += (task / "children").read_text().split()
        except FileNotFoundError:
            continue
    for pid in map(int, children):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if WORKER_MODULE.encode() in cmd:
            spec = WorkerSpec.from_json(cmd[cmd.index(WORKER_MODULE.encode()) + 1].decode())
            out.setdefault("+".join(name for name, _ in spec.members), []).append(pid)
    return out


def shm_objects(pid: int | None = None) -> list[str]:
    """enserve's shared-memory objects (of the daemon ``pid``, or of any)."""
    return sorted(p for p in os.listdir("/dev/shm")
                  if p.startswith(PREFIX) and (pid is None or p.split(".")[1] == str(pid)))
