"""The paper's Table 2: libraries built by several searches in the same wall-clock time (by default
ASHA and random search, as the paper; ``--searches`` picks among Optuna's algorithms and the
inference-aware objective), then the ensemble test error at several budgets (SMOBF and forward greedy with 5
models), the best single model within each budget, the best single model overall and the library
size. Like the paper, each search runs with several seeds (data split and search); the table shows
means over them (the paper shows medians: on digits' 360 test images one error is 0.28 %, so a
median of three moves in steps that size).

    python -m enserve.tuning.table2 --time-budget 2m --workers 2 --seeds 3
    python -m enserve.tuning.table2 --searches ASHA,ASHA+cost --seeds 3   # inference-aware search
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from enserve.tuning.build import best_single, choose
from enserve.tuning.library import Candidates, candidates, write_index
from enserve.tuning.options import BuildOptions, parse_duration
from enserve.tuning.search import build_library

SEARCHES = {  # label: (sampler, pruner, objective)
    "ASHA": ("random", "asha", "error"), "random": ("random", "none", "error"),
    "Hyperband": ("random", "hyperband", "error"), "TPE": ("tpe", "none", "error"), "GP": ("gp", "none", "error"),
    "NSGA-II": ("nsga2", "none", "error"), "TPE+ASHA": ("tpe", "asha", "error"),
    "ASHA+cost": ("random", "asha", "error-and-cost"), "TPE+ASHA+cost": ("tpe", "asha", "error-and-cost"),
}
BUDGET_MULTIPLES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
METHODS = {"SMOBF": "smobf", "greedy-5": "greedy", "Caruana": "caruana"}


def cell(c: Candidates, budget: float, column: str) -> tuple[float, float, int | None] | None:
    """(test error, test loss, members) of a column's choice within ``budget``: an ensemble selected
    by SMOBF or greedy-5, or the best single model (members None); None when nothing fits."""
    if column == "single<=B":
        single = best_single(c, budget)
        return None if single is None else (single["test_error"], single["test_loss"], None)
    try:
        ch = choose(c, budget, method=METHODS[column], n_models=5)
    except ValueError:
        return None
    return ch.test_error, ch.test_loss, len(ch.numbers)


def mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--time-budget", type=parse_duration, default=parse_duration("2m"), help="per search and seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the schedule from the data")
    parser.add_argument("--searches", default="ASHA,random", help=f"comma-separated, of {', '.join(SEARCHES)}")
    parser.add_argument("--input-kind", default="auto")
    parser.add_argument("--seeds", type=int, default=3, help="runs per search (data split and search seed)")
    parser.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the libraries in this folder")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds is {args.seeds}, but must be >= 1")
    searches = [x.strip() for x in args.searches.split(",") if x.strip()]
    unknown = [x for x in searches if x not in SEARCHES]
    if unknown or not searches:
        parser.error(f"--searches {args.searches!r}: each must be one of {', '.join(SEARCHES)}")
    root = args.keep or Path(tempfile.mkdtemp(prefix="enserve-table2-"))
    runs: dict[str, list[Candidates]] = {label: [] for label in searches}
    try:
        for seed in range(args.seeds):
            for label in searches:
                sampler, pruner, objective = SEARCHES[label]
                lib = root / f"{label}_seed{seed}"
                if not (lib / "index.json").is_file():
                    print(f"seed {seed}: building with {label} for {args.time_budget:g} s ...", flush=True)
                    build_library(BuildOptions(dataset=args.dataset, library=lib, sampler=sampler, pruner=pruner,
                                               workers=args.workers, time_budget_s=args.time_budget,
                                               max_epochs=args.max_epochs, seed=seed, objective=objective,
                                               input_kind=args.input_kind))
                    write_index(lib, args.dataset)
                runs[label].append(candidates(lib))
        # one budget scale for every column: the largest cost of a best single model over all runs
        reference = max(best_single(c)["cost"] for cs in runs.values() for c in cs)
        budgets = [reference * k for k in BUDGET_MULTIPLES]
        n_test = len(runs[searches[0]][0].test_labels)
        print(f"\nTable 2 layout, {args.dataset} ({n_test} test samples): mean over {args.seeds} seeds of the "
              f"test error (%) "
              f"[members]; {args.time_budget:g} s per search, {args.workers} workers, "
              f"{args.max_epochs or 'scheduled'} epochs at most; B in seconds per 2000 samples on one core (B/ref: multiples of the "
              f"costliest best single model, {reference:.4f} s)")
        cols = [(label, m) for label in runs for m in (*METHODS, "single<=B")]
        head = f"{'search':<14} {'choice':<10}" + "".join(f" {f'{k:g}xref':>11}" for k in BUDGET_MULTIPLES)
        print(f"budgets B: {', '.join(f'{b:.4f}' for b in budgets)} s")
        for what, index in (("test error (%) [members]", 0), ("test cross-entropy (less noisy on a small test set)", 1)):
            print(f"\n{what}\n{head}")
            for label, m in cols:
                row = f"{label:<14} {m:<10}"
                for b in budgets:
                    got = [cell(c, b, m) for c in runs[label]]
                    value = mean([g and g[index] for g in got])
                    members = mean([g and g[2] for g in got])
                    if np.isnan(value):
                        text = "-"
                    elif index == 0:
                        text = f"{100 * value:.2f}" + ("" if np.isnan(members) else f" [{members:.1f}]")
                    else:
                        text = f"{value:.4f}"
                    row += f" {text:>11}"
                print(row)
        print()
        for label, cs in runs.items():
            singles = [best_single(c) for c in cs]
            print(f"{label}: library size {mean([len(c.numbers) for c in cs]):g} "
                  f"({', '.join(str(len(c.numbers)) for c in cs)}); best single model (by validation loss) "
                  f"test error {100 * mean([s['test_error'] for s in singles]):.2f} % "
                  f"({', '.join(f'{100 * e:.2f}' for e in (s['test_error'] for s in singles))}), cost "
                  f"{mean([s['cost'] for s in singles]):.4f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
