"""Soak: Locust against a real daemon for a given time, with a fault injector killing a worker
every N seconds. Reports requests, failures by kind, p50/p99, the RSS of every process at start
and end, and the daemon's /dev/shm objects before and after.

    python -m enserve.loadtest.soak --minutes 10 --users 32 --kill-every 30
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
from pathlib import Path

from enserve.server.launcher import shm_objects, start_daemon, workers

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between worker SIGKILLs (0: none)")
    parser.add_argument("--model-repository", type=Path, default=None, help="default: the demo ensemble")
    parser.add_argument("--out", type=Path, default=Path("soak_results"), help="Locust CSV/HTML go here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="enserve-soak-"))
    repo = args.model_repository
    if repo is None:
        from enserve.models.demo import write_demo_repository

        repo = tmp / "repo"
        write_demo_repository(repo)
    args.out.mkdir(parents=True, exist_ok=True)
    shm_before = shm_objects()
    daemon = start_daemon(repo, "--no-optimize")
    http, grpc_port = daemon.http_port, daemon.grpc_port
    env = dict(os.environ, ENSERVE_GRPC_URL=f"127.0.0.1:{grpc_port}")
    seconds = int(args.minutes * 60)
    locust = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
         "-u", str(args.users), "-r", str(args.users), "-t", f"{seconds}s", "--host", f"http://127.0.0.1:{http}",
         "--csv", str(args.out / "soak"), "--html", str(args.out / "soak.html"), "--only-summary",
         "GrpcUser", "HttpJsonUser", "HttpBinaryUser"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(args.out / "locust.log", "w"),
    )
    time.sleep(5)  # warm-up before the first reading
    rss_start = {"orchestrator": rss_mib(daemon.pid)} | {f"{m}#{k}": rss_mib(p) for m, pids in workers(daemon.pid).items() for k, p in enumerate(pids)}
    kills: list[tuple[float, str]] = []
    stop = threading.Event()

    def injector() -> None:
        t0 = time.monotonic()
        while args.kill_every > 0 and not stop.wait(args.kill_every):
            live = sorted((m, p) for m, pids in workers(daemon.pid).items() for p in pids)
            if live:
                member, pid = random.choice(live)
                os.kill(pid, signal.SIGKILL)
                kills.append((time.monotonic() - t0, member))

    thread = threading.Thread(target=injector, daemon=True)
    thread.start()
    try:
        locust.wait(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        locust.kill()
        print("locust did not stop in time: killed", file=sys.stderr)
    stop.set()
    thread.join()
    time.sleep(2)
    rss_end = {"orchestrator": rss_mib(daemon.pid)} | {f"{m}#{k}": rss_mib(p) for m, pids in workers(daemon.pid).items() for k, p in enumerate(pids)}
    shm_during = shm_objects(daemon.pid)
    t_stop = time.monotonic()
    code = daemon.stop(60)
    stop_s = time.monotonic() - t_stop
    shm_after = shm_objects()
    report(args, kills, rss_start, rss_end, shm_before, shm_during, shm_after, code, stop_s)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(args, kills, rss_start, rss_end, shm_before, shm_during, shm_after, code, stop_s) -> None:
    rows = list(csv.DictReader(open(args.out / "soak_stats.csv")))
    failures = list(csv.DictReader(open(args.out / "soak_failures.csv")))
    print(f"\nsoak: {args.minutes:g} min, {args.users} users (gRPC, HTTP JSON, HTTP binary), "
          f"a worker SIGKILLed every {args.kill_every:g} s ({len(kills)} kills)")
    print(f"{'endpoint':<22} {'requests':>9} {'failures':>9} {'p50 ms':>7} {'p99 ms':>7} {'req/s':>7}")
    for r in rows:
        name = f"{r['Type']} {r['Name']}".strip()
        print(f"{name:<22} {r['Request Count']:>9} {r['Failure Count']:>9} {r['50%']:>7} {r['99%']:>7} "
              f"{float(r['Requests/s']):>7.1f}")
    print("failures by kind:" + ("" if failures else " none"))
    for f in failures:
        print(f"  {f['Occurrences']:>6} x {f['Method']} {f['Name']}: {f['Error'][:160]}")
    wrong = sum(int(f["Occurrences"]) for f in failures if "wrong answer" in f["Error"])
    print(f"wrong answers: {wrong}; hung requests: none can hang past the 30 s client timeout, "
          f"counted as failures above if any")
    print(f"{'process':<14} {'RSS start MiB':>13} {'RSS end MiB':>11} {'growth':>8}")
    for name in rss_start:
        a, b = rss_start.get(name), rss_end.get(name)
        growth = f"{b - a:+.1f}" if a is not None and b is not None else "-"
        print(f"{name:<14} {a or 0:>13.1f} {b or 0:>11.1f} {growth:>8}")
    print("(a member's RSS at the end is its latest restarted worker's)")
    print(f"/dev/shm enserve objects: before {shm_before}, while serving {len(shm_during)}, after {shm_after}")
    print(f"daemon exit code {code}, stopped {stop_s:.1f} s after SIGTERM; Locust report: {args.out}/soak.html")


if __name__ == "__main__":
    sys.exit(main())
