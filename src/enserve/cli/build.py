"""``enserve build`` (search hyperparameters, select an ensemble, export it) and ``enserve select``
(select another ensemble from a library, no training, and export it)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from enserve import combiners
from enserve.cli.common import FAILURE, USAGE, fail
from enserve.server.served.repository import DEFAULT_ENSEMBLE
from enserve.tuning.build import METHODS
from enserve.tuning.data import INPUT_KINDS
from enserve.tuning.search import OBJECTIVES, PRUNERS, SAMPLERS


def _selection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=float, default=None,
                   help="largest total inference cost of the ensemble, in seconds per 2000 samples on one core "
                        "(default: 3 x the best single model's)")
    p.add_argument("--method", choices=METHODS, default=METHODS[0],
                   help="SMOBF greedy (w in 0.1, 0.01, 0.001), forward greedy with --n-models, or Caruana's selection "
                        "with replacement (served by the combiner's weighted form)")
    p.add_argument("--combiner", choices=combiners.unweighted(), default=combiners.DEFAULT,
                   help="how the ensemble combines its members, served and scored in the selection alike: "
                        + "; ".join(f"{n}: {combiners.get(n).doc}" for n in combiners.unweighted()))
    p.add_argument("--n-models", type=int, default=5, help="models of the forward-greedy baseline")
    p.add_argument("--prune", type=float, default=0.2, help="select among the top fraction of the library")
    p.add_argument("--ensemble", default=DEFAULT_ENSEMBLE, help="name of the ensemble model in the repository")


def _duration(text: str) -> float:
    from enserve.tuning.build import parse_duration  # needs the [tune] extra only when given

    return parse_duration(text)


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="search hyperparameters, select an ensemble, export it to a model repository")
    p.add_argument("--dataset", default="digits", help="digits, or a .npz, .csv, CIFAR archive or image folder")
    p.add_argument("--time-budget", type=_duration, default=600.0, help="search time, e.g. 10m")
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--library", type=Path, default=Path("library"), help="where every trained trial is kept")
    p.add_argument("--storage", default=None,
                   help="Optuna storage shared by the workers: an RDB URL (postgresql://...) for several "
                        "machines; default: a journal file in the library")
    p.add_argument("--workers", type=int, default=2, help="worker processes on this machine")
    p.add_argument("--sampler", choices=SAMPLERS, default=SAMPLERS[0])
    p.add_argument("--pruner", choices=PRUNERS, default=PRUNERS[0],
                   help="asynchronous successive halving over epochs, Hyperband, or none")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epochs of a trial that is never stopped (default: from the data set's size and the "
                        "time budget, printed at the start; ASHA's rungs at 1/27, 1/9, 1/3 of it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", choices=OBJECTIVES, default=OBJECTIVES[0],
                   help="what the search minimises: the validation loss, or the loss plus --cost-weight x the "
                        "trial's inference cost over a middle-sized network's (ASHA compares that sum at every rung)")
    p.add_argument("--cost-weight", type=float, default=0.1, help="weight of the cost for --objective error-and-cost")
    p.add_argument("--input-kind", choices=INPUT_KINDS, default=INPUT_KINDS[0],
                   help="how inputs are read: 4-D arrays are images, 3-D (N, C, L) signals, 2-D rows tabular "
                        "unless 'signal' (one channel); signals search a 1-D residual CNN family")
    _selection_flags(p)
    p.set_defaults(run=run, parser=p)
    p = sub.add_parser("select", help="select another ensemble from a library (no training) and export it")
    p.add_argument("--library", type=Path, required=True)
    p.add_argument("--model-repository", type=Path, required=True)
    _selection_flags(p)
    p.set_defaults(run=run, parser=p)


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

    library = args.library
    if args.command == "build":
        from enserve.tuning.search import build_library, default_storage, running_trials
        from enserve.tuning.workers import BuildFailed

        print(f"building a library in {library} for {args.time_budget:g} s with {args.workers} workers "
              f"({args.sampler} sampler, {args.pruner} pruner); interrupt and rerun to continue", flush=True)
        storage = args.storage or default_storage(library)

        progress = BuildProgress(lambda: build.progress_line(library, running=running_trials(storage),
                                                             budget=args.budget), args.time_budget)
        error: Exception | None = None
        try:
            build_library(args.dataset, library, storage=storage, sampler=args.sampler, pruner=args.pruner,
                          workers=args.workers, time_budget_s=args.time_budget, max_epochs=args.max_epochs,
                          seed=args.seed, progress=progress, progress_every_s=progress.every_s,
                          input_kind=args.input_kind, on_schedule=progress.on_schedule,
                          objective=args.objective, cost_weight=args.cost_weight)
        except (ValueError, BuildFailed) as exc:  # bad data or settings (usage); every trial worker died
            error = exc
        finally:
            progress.close()
        if error is not None:
            return fail("build", error, USAGE if isinstance(error, ValueError) else FAILURE)
        write_index(library, args.dataset)
    try:
        chosen, budget = build.select_and_export(library, args.model_repository, args.ensemble, budget=args.budget,
                                                 method=args.method, prune=args.prune, n_models=args.n_models,
                                                 combiner=args.combiner)
    except (ValueError, OSError, RuntimeError, EnserveError) as exc:
        return fail(args.command, exc)
    print(f"ensemble '{args.ensemble}' of {build.plural(len(chosen.numbers), 'model')} (cost {chosen.cost:.4f} s <= budget "
          f"{budget:.4f} s, test error {chosen.test_error:.4f}) written to {args.model_repository}")
    sys.stdout.flush()
    return 0
