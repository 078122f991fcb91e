"""``enserve build`` (search hyperparameters, select an ensemble, export it) and ``enserve select``
(select another ensemble from a library, no training, and export it)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from enserve.cli.common import FAILURE, USAGE, fail
from enserve.cli.flags import add_flags, values_from
from enserve.tuning.options import BuildOptions, SelectOptions


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="search hyperparameters, select an ensemble, export it to a model repository")
    add_flags(p, BuildOptions)
    p.set_defaults(run=run, parser=p, options_class=BuildOptions)
    p = sub.add_parser("select", help="select another ensemble from a library (no training) and export it")
    add_flags(p, SelectOptions)
    p.set_defaults(run=run, parser=p, options_class=SelectOptions)


class BuildProgress:
    """A build's progress: on a terminal, one line redrawn every second (a bar over the time budget,
    elapsed and remaining time, then the trials and the best so far, refreshed every
    ``LINE_EVERY_S``); plain lines otherwise."""

    LINE_EVERY_S = 10.0

    def __init__(self, line, budget_s: float, stream=None) -> None:
        self.line, self.budget_s = line, budget_s
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every_s = 1.0 if self.tty else self.LINE_EVERY_S
        self.schedule = None
        self.started = time.monotonic()
        self.last_line, self.summary = 0.0, ""
        self.drawn = False

    def on_schedule(self, schedule) -> None:
        self.schedule = schedule
        self.started = time.monotonic()
        print(f"schedule: {schedule.describe()}", file=self.stream, flush=True)

    def __call__(self) -> None:
        now = time.monotonic()
        if not self.tty:
            line = self.line()
            if self.schedule is not None:
                line += f"; schedule: {self.schedule.max_epochs} epochs, rungs {self.schedule.rungs()}"
            print(line, file=self.stream, flush=True)
            return
        if now - self.last_line >= self.LINE_EVERY_S:
            self.last_line, self.summary = now, self.line()
        elapsed = min(self.budget_s, now - self.started)
        width = shutil.get_terminal_size((100, 20)).columns
        text = f"{bar(elapsed / self.budget_s, 20)} {elapsed:.0f}/{self.budget_s:.0f} s, {self.budget_s - elapsed:.0f} s left; "
        text += self.summary
        self.stream.write("\r" + text[: width - 1].ljust(width - 1))
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def bar(fraction: float, width: int) -> str:
    done = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * done + "." * (width - done) + "]"


def run(args: argparse.Namespace) -> int:
    """Build (search, then select) or select only."""
    from enserve.server.errors import EnserveError
    from enserve.tuning import build
    from enserve.tuning.library import write_index

    try:
        options = args.options_class(**values_from(args, args.options_class))
        options.validate()
    except ValueError as exc:
        return fail(args.command, exc, USAGE)
    library = options.library
    if args.command == "build":
        from enserve.tuning.search import build_library
        from enserve.tuning.study import default_storage, running_trials
        from enserve.tuning.workers import BuildFailed

        storage = options.storage or default_storage(library)

        progress = BuildProgress(lambda: build.progress_line(library, running=running_trials(storage),
                                                             budget=options.budget), options.time_budget_s)
        error: Exception | None = None
        try:
            build_library(options, progress=progress, progress_every_s=progress.every_s,
                          on_schedule=progress.on_schedule, say=lambda line: print(line, flush=True))
        except (ValueError, BuildFailed) as exc:  # bad data or settings (usage); every trial worker died
            error = exc
        finally:
            progress.close()
        if error is not None:
            return fail("build", error, USAGE if isinstance(error, ValueError) else FAILURE)
        write_index(library, options.dataset)
    try:
        chosen, budget = build.select_and_export(options)
    except (ValueError, OSError, RuntimeError, EnserveError) as exc:
        return fail(args.command, exc)
    print(f"ensemble '{options.ensemble}' of {build.plural(len(chosen.numbers), 'model')} (cost {chosen.cost:.4f} s "
          f"<= budget {budget:.4f} s, test error {chosen.test_error:.4f}) written to {options.model_repository}")
    sys.stdout.flush()
    return 0
