"""Soak: Locust against a real daemon, run as a container runs it, with a fault every N seconds.

The daemon is PID 1 of its own pid namespace with a small tmpfs as /dev/shm (root only, as in CI:
``unshare -m -p -f``). Every ``--fault-every`` seconds one fault, the three kinds in turn (shuffled
each round): SIGKILL a worker; SIGSTOP a worker for ``--stop-for`` seconds; SIGKILL the whole
daemon and start it again on the same ports and /dev/shm, as a supervisor does. Reports requests,
failures by kind, p50/p99, RSS per process at start and end, and /dev/shm before, during, after.

It cannot pass empty: it exits 1, saying why, when Locust exits non-zero, when it completed no
request (every user failing to start, say), when no request completed between one fault and the
next, or when an answer was wrong.

    python -m enserve.loadtest.soak --minutes 10 --users 32 --shm-mib 64 --fault-every 30
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from enserve.loadtest.launcher import (
    Server,
    container_command,
    free_ports,
    mount_tmpfs,
    namespace_pid1,
    start_daemon,
    workers,
)
from enserve.server.dataplane.shm import PREFIX
from enserve.server.served.repository import DEFAULT_ENSEMBLE

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
FAULTS = ("kill worker", "stop worker", "kill daemon")


@dataclass(frozen=True)
class Fault:
    at: float  # unix time, against Locust's history
    offset: float  # seconds after the injector started
    kind: str
    detail: str


def fault_kinds(text: str) -> tuple[str, ...]:
    """'kill-worker,stop-worker' -> the kinds; an argparse type naming the ones it knows."""
    kinds = tuple(k.strip().replace("-", " ") for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULTS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"faults {text!r}: give some of {', '.join(f.replace(' ', '-') for f in FAULTS)}")
    return kinds


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def shm_state(shm: Path) -> tuple[int, float]:
    """(enserve objects, MiB used) of the container's /dev/shm."""
    st = os.statvfs(shm)
    return len([p for p in shm.iterdir() if p.name.startswith(PREFIX)]), \
        (st.f_blocks - st.f_bfree) * st.f_frsize / 2**20


class Supervised:
    """The daemon as PID 1 of a container, restarted on the same ports after a SIGKILL."""

    def __init__(self, repo: Path, shm: Path, log_dir: Path, flags: list[str]) -> None:
        self.repo, self.shm, self.log_dir, self.flags = repo, shm, log_dir, flags
        self.ports = tuple(free_ports(3))
        self.starts = 0
        self.server: Server | None = None
        self.pid = -1
        self.start()

    def start(self) -> float:
        t0 = time.monotonic()
        self.starts += 1
        self.server = start_daemon(self.repo, *self.flags, ports=self.ports, wrap=container_command(self.shm, True),
                                   log=self.log_dir / f"daemon{self.starts}.log")
        self.pid = namespace_pid1(self.server.pid)
        return time.monotonic() - t0

    def processes(self) -> dict[str, int]:
        return {"daemon": self.pid} | {f"{m}#{k}": p for m, pids in workers(self.pid).items()
                                       for k, p in enumerate(pids)}

    def kill_and_restart(self) -> float:
        self.server.stop(pid=self.pid, sig=signal.SIGKILL)
        return self.start()

    def stop(self, timeout: float = 60) -> tuple[int, float]:
        t0 = time.monotonic()
        code = self.server.stop(timeout, pid=self.pid)
        return code, time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--images", type=int, default=8, help="most images per request")
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults (0: none)")
    parser.add_argument("--faults", type=fault_kinds, default=FAULTS,
                        help="the kinds to inject, in turn (default: kill-worker,stop-worker,kill-daemon)")
    parser.add_argument("--stop-for", type=float, default=20.0, help="seconds a SIGSTOPped worker stays stopped")
    parser.add_argument("--shm-mib", type=int, default=64, help="the container's /dev/shm")
    parser.add_argument("--model-repository", type=Path, default=None, help="default: the demo ensemble")
    parser.add_argument("--model", default=DEFAULT_ENSEMBLE, help="the model the users ask")
    parser.add_argument("--out", type=Path, default=Path("soak_results"), help="Locust CSV/HTML go here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("serve_flags", nargs="*", help="after --: flags for enserve serve "
                        "(default: --no-optimize --worker-timeout 5)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="enserve-soak-"))
    shm = tmp / "shm"
    mount_tmpfs(shm, args.shm_mib)
    try:
        return run(args, rng, tmp, shm)
    finally:
        subprocess.run(["umount", "-l", str(shm)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, rng: random.Random, tmp: Path, shm: Path) -> int:
    repo = args.model_repository
    if repo is None:
        from enserve.models.demo import write_demo_repository

        repo = tmp / "repo"
        write_demo_repository(repo)
    args.out.mkdir(parents=True, exist_ok=True)
    shm_before = shm_state(shm)
    daemon = Supervised(repo, shm, args.out, args.serve_flags or ["--no-optimize", "--worker-timeout", "5"])
    http, grpc_port, _ = daemon.ports
    env = dict(os.environ, ENSERVE_GRPC_URL=f"127.0.0.1:{grpc_port}", ENSERVE_MAX_IMAGES=str(args.images),
               ENSERVE_MODEL=args.model)
    seconds = int(args.minutes * 60)
    locust = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
         "-u", str(args.users), "-r", str(args.users), "-t", f"{seconds}s", "--host", f"http://127.0.0.1:{http}",
         "--csv", str(args.out / "soak"), "--html", str(args.out / "soak.html"), "--only-summary",
         "--exit-code-on-error", "0",  # failed requests are the soak's to judge; non-zero is Locust's own failure
         "GrpcUser", "HttpJsonUser", "HttpBinaryUser"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(args.out / "locust.log", "w"),
    )
    time.sleep(5)  # warm-up before the first reading
    rss_start = {name: rss_mib(pid) for name, pid in daemon.processes().items()}
    faults: list[Fault] = []
    shm_peak = shm_state(shm)
    stop = threading.Event()
    locust_end = time.monotonic() + seconds - 5  # Locust's run ends here (it started 5 s ago)

    def injector() -> None:
        nonlocal shm_peak
        t0, kinds = time.monotonic(), []
        while args.fault_every > 0 and not stop.wait(args.fault_every):
            if time.monotonic() + min(5.0, args.fault_every / 2) > locust_end:
                return  # a fault needs traffic after it to be judged
            if not kinds:
                kinds = rng.sample(args.faults, len(args.faults))
            kind = kinds.pop()
            state = shm_state(shm)
            shm_peak = max(shm_peak, state, key=lambda s: s[1])
            live = sorted((m, p) for m, pids in workers(daemon.pid).items() for p in pids)
            detail = ""
            if kind == "kill daemon":
                detail = f"back in {daemon.kill_and_restart():.1f} s"
            elif live:
                member, pid = rng.choice(live)
                detail = member
                if kind == "kill worker":
                    os.kill(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGSTOP)
                    threading.Timer(args.stop_for, _resume, (pid,)).start()
            faults.append(Fault(time.time(), time.monotonic() - t0, kind, detail))

    thread = threading.Thread(target=injector, daemon=True)
    thread.start()
    try:
        locust.wait(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        locust.kill()
        print("locust did not stop in time: killed", file=sys.stderr)
    ended = time.time()
    stop.set()
    thread.join()
    time.sleep(args.stop_for if faults and faults[-1].kind == "stop worker" else 2)
    rss_end = {name: rss_mib(pid) for name, pid in daemon.processes().items()}
    shm_during = shm_state(shm)
    code, stop_s = daemon.stop()
    shm_after = shm_state(shm)
    report(args, faults, rss_start, rss_end, (shm_before, shm_peak, shm_during, shm_after), code, stop_s)
    problems = verdict(args.out, locust.returncode, faults, ended)
    for problem in problems:
        print(f"soak FAILED: {problem}")
    return 1 if problems else 0


def completed_by(history: list[dict], when: float) -> int:
    """Requests Locust had completed (answered or failed) by unix time ``when``, from its history."""
    done = [int(r["Total Request Count"]) for r in history if float(r["Timestamp"]) <= when]
    return max(done, default=0)


def verdict(out: Path, locust_code: int | None, faults: list[Fault], ended: float) -> list[str]:
    """Why the soak failed, if it did: Locust's own failure, no request at all, a fault window
    without traffic, a wrong answer."""
    problems = []
    if locust_code != 0:
        problems.append(f"Locust exited with code {locust_code} (see {out / 'locust.log'})")
    rows = list(csv.DictReader(open(out / "soak_stats.csv")))
    total = sum(int(r["Request Count"]) for r in rows if r["Name"] == "Aggregated")
    if total == 0:
        errors = list(csv.DictReader(open(out / "soak_exceptions.csv"))) if (out / "soak_exceptions.csv").exists() else []
        why = f": the users failed with {errors[0]['Message'][:300]!r}" if errors else ""
        problems.append(f"Locust completed no requests{why}")
    else:
        history = [r for r in csv.DictReader(open(out / "soak_stats_history.csv")) if r["Name"] == "Aggregated"]
        bounds = [f.at for f in faults] + [ended]
        for k, fault in enumerate(faults):
            served = completed_by(history, bounds[k + 1]) - completed_by(history, bounds[k])
            if served == 0:
                problems.append(f"no request completed between fault {k + 1} ({fault.kind}) and "
                                f"{'the next' if k + 1 < len(faults) else 'the end'}: the fault hit no traffic")
    failures = list(csv.DictReader(open(out / "soak_failures.csv")))
    wrong = sum(int(f["Occurrences"]) for f in failures if "wrong answer" in f["Error"])
    if wrong:
        problems.append(f"{wrong} wrong answers")
    return problems


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # the watchdog (or a daemon kill) ended it meanwhile


def report(args, faults, rss_start, rss_end, shm_states, code, stop_s) -> None:
    rows = list(csv.DictReader(open(args.out / "soak_stats.csv")))
    failures = list(csv.DictReader(open(args.out / "soak_failures.csv")))
    counts = {k: sum(1 for f in faults if f.kind == k) for k in args.faults}
    print(f"\nsoak: {args.minutes:g} min, {args.users} users (gRPC, HTTP JSON, HTTP binary; 1-{args.images} "
          f"images), daemon as PID 1 with a {args.shm_mib} MiB /dev/shm; a fault every {args.fault_every:g} s: "
          + ", ".join(f"{k} x{n}" for k, n in counts.items()))
    for t, kind, detail in ((f.offset, f.kind, f.detail) for f in faults):
        print(f"  {t:6.0f} s  {kind:<12} {detail}")
    print(f"{'endpoint':<22} {'requests':>9} {'failures':>9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'req/s':>7}")
    for r in rows:
        name = f"{r['Type']} {r['Name']}".strip()
        print(f"{name:<22} {r['Request Count']:>9} {r['Failure Count']:>9} {r['50%']:>7} {r['99%']:>7} "
              f"{float(r['Max Response Time']):>8.0f} {float(r['Requests/s']):>7.1f}")
    print("failures by kind:" + ("" if failures else " none"))
    for f in failures:
        print(f"  {f['Occurrences']:>6} x {f['Method']} {f['Name']}: {f['Error'][:160]}")
    wrong = sum(int(f["Occurrences"]) for f in failures if "wrong answer" in f["Error"])
    hung = sum(int(f["Occurrences"]) for f in failures if "imeout" in f["Error"] or "DEADLINE" in f["Error"])
    print(f"wrong answers: {wrong}; timed out at the client (30 s): {hung}")
    print(f"{'process':<14} {'RSS start MiB':>13} {'RSS end MiB':>11}")
    for name in sorted(set(rss_start) | set(rss_end)):
        a, b = rss_start.get(name), rss_end.get(name)
        print(f"{name:<14} {a or 0:>13.1f} {b or 0:>11.1f}")
    print("(after a daemon or worker restart, the end figure is the new process's)")
    labels = ("before", "peak at a fault", "at the end", "after stop")
    print("/dev/shm: " + "; ".join(f"{label} {n} objects, {mib:.1f} MiB" for label, (n, mib) in zip(labels, shm_states)))
    print(f"daemon exit code {code}, stopped {stop_s:.1f} s after SIGTERM; Locust report: {args.out}/soak.html")


if __name__ == "__main__":
    sys.exit(main())
