"""The paper's Table 2 on digits: libraries built with ASHA and with random search in the same
wall-clock time, then the ensemble test error at several budgets (SMOBF and forward greedy), the
best single model's test error and the library size.

    python -m tuning.table2 --time-budget 3m --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from tuning.build import best_single, choose
from tuning.library import candidates, write_index
from tuning.search import build_library

SEARCHES = {"ASHA": ("random", "asha"), "random search": ("random", "none")}


def main() -> int:
    from enserve.cli import _duration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--time-budget", type=_duration, default=_duration("3m"), help="per search algorithm")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="keep the libraries in this folder")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="enserve-table2-"))
    libs = {}
    try:
        for label, (sampler, pruner) in SEARCHES.items():
            lib = root / label.replace(" ", "_")
            print(f"building with {label} for {args.time_budget:g} s ...", flush=True)
            build_library(args.dataset, lib, sampler=sampler, pruner=pruner, workers=args.workers,
                          time_budget_s=args.time_budget, max_epochs=args.max_epochs, seed=args.seed)
            write_index(lib, args.dataset)
            libs[label] = candidates(lib)
        cheapest = min(float(np.min(c.costs)) for c in libs.values())
        budgets = [cheapest * k for k in (1, 2, 4, 8, 16, 32)]
        print(f"\nTable 2 layout, {args.dataset}, {args.time_budget:g} s per search, {args.workers} workers, "
              f"{args.max_epochs} epochs at most; budget B in seconds per 2000 samples on one core")
        head = f"{'B (s)':>8}" + "".join(f" {label + ' ' + m:>22}" for label in libs for m in ("SMOBF", "greedy-5"))
        print(head)
        for b in budgets:
            row = f"{b:>8.4f}"
            for c in libs.values():
                for method in ("smobf", "greedy"):
                    try:
                        ch = choose(c, b, method=method, n_models=5)
                        row += f" {ch.test_error:>14.4f} ({len(ch.numbers)} m)"
                    except ValueError:
                        row += f" {'-':>22}"
            print(row)
        for label, c in libs.items():
            single = best_single(c)
            print(f"{label}: library size {len(c.numbers)}, best single model test error "
                  f"{single['test_error']:.4f} (cost {single['cost']:.4f} s)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
