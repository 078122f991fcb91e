"""This tree's daemon against an earlier revision's, side by side: ``enserve bench``'s closed-loop
cells (``bench.measure``) on every arm in turn, the arms' order rotated each round so that a
drifting machine favours none; per cell, the median round's images/s and the CPU per request of
the daemon's own process (its fronts and orchestrator, where a change to the serving path shows; its
workers' is not counted), as ratios to the earlier revision's. What a claim such as "within 3 % of today" is
measured with (these machines are noisy: use many short rounds).

    python -m enserve.loadtest.ab --model-repository DIR --before REV [--serve-flags '--plan PLAN'] \\
        [--arm 'objective=DIR2 --objective-ms 1000'] [--rounds 15] [--seconds 3] [--cells 1x1,16x1,1x8]

The earlier revision is checked out into a temporary git worktree of the clone this runs in (run
it from the clone) and
run with this interpreter (``PYTHONPATH`` its ``src``): its dependencies must be this
environment's. Arms: ``before`` (REV), ``now`` (this tree), and any ``--arm NAME=REPOSITORY
[serve flags]`` (this tree, another repository or other flags); ``--serve-flags`` go to every
arm's ``enserve serve`` (a saved plan, so that no arm runs the allocator and all serve one
placement).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from enserve.loadtest.bench import Cell, measure, median_cell
from enserve.loadtest.launcher import Server, start_daemon
from enserve.loadtest.signature import signature
from enserve.server.served.repository import DEFAULT_ENSEMBLE

BEFORE = "before"


@dataclass(frozen=True)
class Arm:
    name: str
    repository: Path
    flags: tuple[str, ...] = ()
    src: Path | None = None  # another tree's ``src`` (PYTHONPATH), or None: this one


def parse_arm(text: str) -> tuple[str, Path, tuple[str, ...]]:
    """``NAME=REPOSITORY [serve flags]`` as (name, repository, flags)."""
    name, sep, rest = text.partition("=")
    words = shlex.split(rest)
    if not sep or not name.strip() or not words:
        raise argparse.ArgumentTypeError(f"--arm '{text}' is not NAME=REPOSITORY [serve flags]")
    if name.strip() == BEFORE:
        raise argparse.ArgumentTypeError(f"--arm '{text}': '{BEFORE}' is the earlier revision's arm")
    return name.strip(), Path(words[0]), tuple(words[1:])


def parse_cells(text: str) -> list[tuple[int, int]]:
    """``1x1,16x1,1x8`` (concurrency x images a request) as pairs."""
    try:
        cells = [tuple(int(v) for v in c.split("x")) for c in text.split(",")]
    except ValueError:
        cells = []
    if not cells or any(len(c) != 2 or min(c) < 1 for c in cells):
        raise argparse.ArgumentTypeError(f"--cells '{text}' is not a list such as 1x1,16x1,1x8 (both >= 1)")
    return cells  # type: ignore[return-value]


@contextmanager
def worktree(revision: str):
    """The clone's tree at ``revision`` in a temporary folder, removed afterwards."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0:
        raise SystemExit(f"--before needs a git clone: run from one ({top.stderr.strip()})")
    root = Path(top.stdout.strip())
    with tempfile.TemporaryDirectory(prefix="enserve-ab-") as tmp:
        path = Path(tmp) / "tree"
        made = subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(path), revision],
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"--before {revision}: {made.stderr.strip()}")
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(path)], capture_output=True)


def start(arm: Arm, common: tuple[str, ...], log_dir: Path) -> Server:
    env = None if arm.src is None else dict(os.environ, PYTHONPATH=str(arm.src))
    return start_daemon(arm.repository, *common, *arm.flags, log=log_dir / f"{arm.name}.log", timeout=300,
                        cwd=log_dir, env=env)


def rounds_of(arms: list[Arm], servers: dict[str, Server], model: str, cells: list[tuple[int, int]],
              rounds: int, seconds: float) -> dict[tuple[str, int, int], list[Cell]]:
    """Every arm on every cell, ``rounds`` times; the arms' order rotates by cell and by round."""
    sig = signature(servers[arms[0].name].grpc_url, model)
    got: dict[tuple[str, int, int], list[Cell]] = {}
    for r in range(rounds):
        for k, (conc, images) in enumerate(cells):
            shift = (k + r) % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                s = servers[arm.name]
                got.setdefault((arm.name, conc, images), []).append(
                    measure(arm.name, s.grpc_url, model, conc, images, seconds, sig, pid=s.pid))
    return got


def cpu_per_request_us(cells: list[Cell]) -> float:
    """The daemon's own process's CPU per request over all rounds (not its workers'), microseconds."""
    return 1e6 * sum(c.front_cpu_s for c in cells) / max(1, sum(c.requests for c in cells))


def table(arms: list[Arm], got: dict[tuple[str, int, int], list[Cell]], cells: list[tuple[int, int]]) -> list[str]:
    """Per cell and arm: median images/s, p50, daemon CPU per request, and both as ratios to ``before``."""
    lines = ["| cell | arm | img/s (median round) | p50 ms | x before | daemon process CPU us/req | x before | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for conc, images in cells:
        base = got[(BEFORE, conc, images)]
        base_rate, base_cpu = median_cell(base).images_per_s or float("nan"), cpu_per_request_us(base) or float("nan")
        for arm in arms:
            runs = got[(arm.name, conc, images)]
            mid, cpu = median_cell(runs), cpu_per_request_us(runs)
            lines.append(f"| c{conc} x {images} | {arm.name} | {mid.images_per_s:.0f} | {mid.pct(50):.2f} | "
                         f"{mid.images_per_s / base_rate:.3f} | {cpu:.0f} | {cpu / base_cpu:.3f} | "
                         f"{sum(c.errors for c in runs)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(prog="python -m enserve.loadtest.ab", description=__doc__, formatter_class=Formatter)
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--before", required=True, help="the git revision to compare with (e.g. a commit, main~3): "
                   "the arm 'before'; this tree is the arm 'now'")
    p.add_argument("--serve-flags", type=shlex.split, default=[],
                   help="flags for every arm's enserve serve, e.g. '--plan plan.json' (no allocator run)")
    p.add_argument("--arm", type=parse_arm, action="append", default=[],
                   help="NAME=REPOSITORY [serve flags]: one more arm of this tree, serving another repository "
                   "or with other flags (repeatable)")
    p.add_argument("--model", default=DEFAULT_ENSEMBLE, help="the model every cell asks")
    p.add_argument("--rounds", type=int, default=15, help="times every arm runs every cell")
    p.add_argument("--seconds", type=float, default=3.0, help="of one cell on one arm, after a warm-up")
    p.add_argument("--cells", type=parse_cells, default="1x1,16x1,1x8",
                   help="CONCURRENCYxIMAGES a request, comma-separated")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds is {args.rounds}, but must be >= 1")
    if not args.seconds > 0:
        p.error(f"--seconds is {args.seconds}, but must be > 0")
    servers: dict[str, Server] = {}
    with worktree(args.before) as tree, tempfile.TemporaryDirectory(prefix="enserve-ab-logs-") as logs:
        arms = [Arm(BEFORE, args.model_repository, (), tree / "src"), Arm("now", args.model_repository),
                *(Arm(name, repo, flags) for name, repo, flags in args.arm)]
        if len({a.name for a in arms}) != len(arms):
            p.error(f"arm names must differ: {[a.name for a in arms]}")
        try:
            for arm in arms:
                servers[arm.name] = start(arm, tuple(args.serve_flags), Path(logs))
            got = rounds_of(arms, servers, args.model, args.cells, args.rounds, args.seconds)
        finally:
            for s in servers.values():
                s.stop()
    print(f"{args.rounds} rounds of {args.seconds:g} s a cell; before = {args.before}")
    print("\n".join(table(arms, got, args.cells)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
