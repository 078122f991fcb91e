"""The build's trial workers: processes that pull trials from the shared study until the deadline,
each started as ``python -m enserve.tuning.trial_worker '<json>'``, watched, and heard from.

A worker's standard error is passed on as it comes and its last lines are kept: a worker that
dies (it cannot import enserve, load the data, reach the storage) is reported at once with what it
said, and when every worker has died the build stops there with that error instead of waiting out
its time budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from enserve.child import python_module

TAIL_LINES = 20  # of a dead worker's standard error, shown with its exit code


class BuildFailed(RuntimeError):
    """Every trial worker died: nothing can train."""


@dataclass(eq=False)
class TrialWorker:
    index: int
    proc: subprocess.Popen
    tail: deque = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    reported: bool = False
    reader: threading.Thread | None = None  # passes its standard error on; ends at its EOF

    def failure(self) -> str:
        said = "".join(self.tail).rstrip() or "(it printed nothing)"
        return f"trial worker {self.index} exited with code {self.proc.returncode}:\n{said}"


def _pass_on(worker: TrialWorker) -> None:
    """Forward the worker's standard error line by line, keeping the last lines."""
    for line in iter(worker.proc.stderr.readline, ""):
        worker.tail.append(line)
        sys.stderr.write(line)
    worker.proc.stderr.close()


def start(worker_kwargs: list[dict], module: str = "enserve.tuning.trial_worker") -> list[TrialWorker]:
    """One process per dict of keyword arguments (JSON on its command line) of ``module``'s main:
    the search's trial workers, or the finishing workers."""
    workers = []
    for index, kwargs in enumerate(worker_kwargs):
        proc = subprocess.Popen(python_module(module, json.dumps(kwargs)),
                                stderr=subprocess.PIPE, text=True, errors="replace")
        worker = TrialWorker(index, proc)
        worker.reader = threading.Thread(target=_pass_on, args=(worker,), daemon=True, name=f"trial-worker-{index}")
        worker.reader.start()
        workers.append(worker)
    return workers


def watch(workers: list[TrialWorker], *, progress: Callable[[], None] | None = None, progress_every_s: float = 10.0,
          report: Callable[[str], None] | None = None, poll_s: float = 0.2) -> None:
    """Until every worker has exited: ``progress()`` every ``progress_every_s``; a worker that exits
    with an error is ``report``ed at once; raises BuildFailed when every one of them did."""
    report = report or (lambda message: print(message, file=sys.stderr, flush=True))
    last = time.monotonic()
    while any(w.proc.poll() is None for w in workers):
        time.sleep(poll_s)
        for w in workers:
            if w.proc.poll() not in (None, 0) and not w.reported:
                w.reader.join(5)  # everything it printed, up to its end
                w.reported = True
                report(w.failure())
        if progress is not None and time.monotonic() - last >= progress_every_s:
            last = time.monotonic()
            progress()
    for w in workers:
        w.proc.wait()
    failed = [w for w in workers if w.proc.returncode != 0]
    for w in failed:
        if not w.reported:
            w.reader.join(5)
            w.reported = True
            report(w.failure())
    if failed and len(failed) == len(workers):  # (none started: nothing failed)
        raise BuildFailed(f"every trial worker died, so nothing was trained; the first said:\n{failed[0].failure()}")


def stop(workers: list[TrialWorker]) -> None:
    """Terminate the workers still running (an interrupted build); their trials stay in the study."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.terminate()
    for w in workers:
        try:
            w.proc.wait(30)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
