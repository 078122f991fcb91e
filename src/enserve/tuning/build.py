"""From a library to an ensemble: pruning, selection under a budget, the Pareto front and its plot."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from enserve import combiners
from enserve.server.served.front import FrontPoint
from enserve.tuning.library import Candidates, candidates, read_records, trial_dir
from enserve.tuning.options import METHODS, SelectOptions
from enserve.tuning.selection import (
    Selection,
    caruana,
    cross_entropy,
    error_rate,
    forward_greedy,
    nested_order,
    prefix_points,
    prune_top,
    smobf_best,
)

CARUANA_ITERATIONS = 50


@dataclass
class Chosen:
    selection: Selection
    numbers: list[int]  # trial numbers of the members
    val_error: float
    test_error: float
    test_loss: float
    cost: float
    weights: list[float] | None = None  # per member (Caruana's repeats): served by the weighted twin
    combiner: str = combiners.DEFAULT  # what the ensemble is served with
    considered: int = 0  # candidates the selection chose among (within the budget and the --prune fraction)


def choose(c: Candidates, budget: float, *, method: str = "smobf", prune: float = 0.2,
           n_models: int = 5, combiner: str = combiners.DEFAULT) -> Chosen:
    """The ensemble chosen within ``budget`` (seconds) among the top ``prune`` fraction (by validation
    loss) of the models that fit the budget (a model costing more than B can never be a member, so
    it does not take a place in the top fraction), scored as ``combiner`` will serve it."""
    if combiners.get(combiner).weighted:
        raise ValueError(f"combiner '{combiner}' is weighted: the selection sets the weights (method caruana); name "
                         f"an unweighted one: {combiners.unweighted()}")
    fits = np.flatnonzero(c.costs <= budget)
    if not len(fits):
        raise ValueError(f"no model fits the budget {budget:g} (cheapest costs {float(np.min(c.costs)):g})")
    keep = fits[prune_top(c.val_losses[fits], prune)]
    preds, costs = c.val_preds[keep], c.costs[keep]
    labels = c.labels
    if method == "smobf":
        sel = smobf_best(preds, labels, costs, budget, combiner=combiner)
    elif method in ("greedy", "caruana"):
        sel = (forward_greedy(preds, labels, n_models, costs, budget, combiner) if method == "greedy"
               else caruana(preds, labels, CARUANA_ITERATIONS, costs, budget, combiner))
        if not sel.members:
            raise ValueError(f"no model fits the budget {budget:g}")
    else:
        raise ValueError(f"selection method '{method}' is not one of {METHODS}")
    picks = [int(keep[m]) for m in sel.members]  # a repeated pick weighs more (Caruana)
    members = list(dict.fromkeys(picks))
    weights = [picks.count(m) / len(picks) for m in members] if len(members) < len(picks) else None
    served = combiners.get(combiner) if weights is None else combiners.weighted_twin(combiner)
    val = served.combine(c.val_preds[members], weights)
    test = served.combine(c.test_preds[members], weights)
    return Chosen(sel, [c.numbers[m] for m in members], error_rate(val, labels), error_rate(test, c.test_labels),
                  cross_entropy(test, c.test_labels), float(c.costs[members].sum()), weights, served.name, len(keep))


def pareto_rows(c: Candidates, budgets: list[float], **kw) -> list[dict]:
    rows = []
    for b in budgets:
        try:
            ch = choose(c, b, **kw)
        except ValueError:
            continue
        rows.append({"budget": b, "members": len(ch.numbers), "cost": ch.cost,
                     "val_loss": ch.selection.loss, "val_error": ch.val_error, "test_error": ch.test_error})
    return rows


def compare_methods(c: Candidates, budgets: list[float], **kw) -> str:
    """One table: test error [members] of SMOBF, forward greedy and Caruana at each budget."""
    lines = [f"{'budget s':>9} {'SMOBF':>13} {'greedy':>13} {'Caruana':>13}  (test error [members])"]
    for b in budgets:
        cells = []
        for method in METHODS:
            try:
                ch = choose(c, b, method=method, **kw)
                cells.append(f"{ch.test_error:.4f} [{len(ch.numbers)}]")
            except ValueError:
                cells.append("-")
        lines.append(f"{b:>9.4f} " + " ".join(f"{x:>13}" for x in cells))
    return "\n".join(lines)


def best_single(c: Candidates, budget: float = math.inf) -> dict | None:
    """The model with the lowest validation loss among those costing <= ``budget`` (None if none does)."""
    fits = np.flatnonzero(c.costs <= budget)
    if not len(fits):
        return None
    i = int(fits[np.argmin(c.val_losses[fits])])
    return {"number": c.numbers[i], "cost": float(c.costs[i]), "val_loss": float(c.val_losses[i]),
            "test_error": error_rate(c.test_preds[i], c.test_labels),
            "test_loss": cross_entropy(c.test_preds[i], c.test_labels)}


def default_budget(c: Candidates, prune: float = 0.2) -> float:
    """Room for about three good models: 3 x the median cost of the top ``prune`` fraction by
    validation loss, and at least 3 x the best single model's cost. (Three times the best model's
    cost alone leaves no room for a costlier second member when the best is also the cheapest.)"""
    top = prune_top(c.val_losses, prune)
    best = int(np.argmin(c.val_losses))
    return 3 * max(float(c.costs[best]), float(np.median(c.costs[top])))


def default_budgets(c: Candidates, n: int = 6) -> list[float]:
    """From the cheapest model's cost to the sum of the top-20 % models' costs, geometric."""
    lo = float(np.min(c.costs))
    hi = max(lo * 1.01, float(np.sum(np.sort(c.costs)[: max(2, math.ceil(0.2 * len(c.costs)))])) * 2)
    return [float(x) for x in np.geomspace(lo, hi, n)]


def plot(c: Candidates, curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Test error against inference cost: every single model, and one line per selection method
    (rows of ``pareto_rows``), each point labelled with its budget and size, as the paper's Figures 5-6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    singles = [error_rate(p, c.test_labels) for p in c.test_preds]
    ax.scatter(c.costs, singles, s=12, alpha=0.4, color="grey", label="single models")
    for k, (label, rows) in enumerate(curves.items()):
        rows = sorted(rows, key=lambda r: r["budget"])
        ax.plot([r["cost"] for r in rows], [r["test_error"] for r in rows], "o-", color=f"C{k}", label=label)
        for r in rows:
            ax.annotate(f"B{r['budget']:.2g} #{r['members']}", (r["cost"], r["test_error"]), fontsize=6,
                        color=f"C{k}", xytext=(3, 3 + 8 * k), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.01)  # linear near 0 (an error of 0 stays on the plot), log above 1 %
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("inference cost (s per 2000 samples, one core)")
    ax.set_ylabel("test error")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def progress_line(library: Path, *, running: int | None = None, budget: float | None = None) -> str:
    """Trials running, finished and stopped; the best single model and best ensemble so far."""
    records = read_records(library)
    states = {s: sum(r.state == s for r in records) for s in ("complete", "pruned", "failed")}
    line = f"trials: {'' if running is None else f'{running} running, '}{states['complete']} finished, " \
           f"{states['pruned']} stopped early, {states['failed']} failed"
    usable = [r for r in records if r.state != "failed"]
    if usable:
        best = min(usable, key=lambda r: r.val_loss)
        line += f"; best single: trial {best.number} val error {best.val_error:.3f}"
        if math.isfinite(best.cost_s):
            try:
                c = candidates(library)
                chosen = choose(c, budget if budget is not None else default_budget(c))
                line += f"; best ensemble: {plural(len(chosen.numbers), 'model')}, val error {chosen.val_error:.3f}"
            except (ValueError, OSError):
                pass  # nothing fits the budget yet, or a trial is being written
    return line



def select_and_export(options: SelectOptions, progress: Callable[[str], None] = print) -> tuple[Chosen, float]:
    """The selection stage and the export: the Pareto table (SMOBF against forward greedy) and its
    plot, then the ensemble chosen under the budget (default: ``default_budget``)
    written into the repository. Returns it and the budget used."""
    from enserve.tuning.export import export_members
    from enserve.tuning.finish import kfold_candidates

    library, prune, n_models = Path(options.library), options.prune, options.n_models
    c = kfold_candidates(library) if options.validation != "holdout" else None
    if c is None and options.validation == "kfold":
        progress(f"--validation kfold: the library {library} holds no configuration trained on every fold yet; "
                 "the selection compares the search's trials on the validation split")
    if c is not None:
        prune = 1.0  # the finished configurations are the library's best already
        progress(f"\nselection on out-of-fold predictions for all {len(c.labels)} training and validation rows "
                 f"({plural(len(c.numbers), 'configuration')} trained on every fold, each served as its fold models)")
    else:
        c = candidates(library)
    single = best_single(c)
    budget = options.budget if options.budget is not None else default_budget(c, prune)
    rows = pareto_rows(c, default_budgets(c) + [budget], prune=prune)
    progress(f"\nlibrary: {plural(len(c.numbers), 'model')}; best single model: trial {single['number']}, "
             f"test error {single['test_error']:.4f}, cost {single['cost']:.4f} s")
    progress(f"{'budget s':>9} {'members':>7} {'cost s':>8} {'val loss':>8} {'val err':>7} {'test err':>8}")
    for r in sorted(rows, key=lambda r: r["budget"]):
        progress(f"{r['budget']:>9.4f} {r['members']:>7} {r['cost']:>8.4f} {r['val_loss']:>8.4f} "
                 f"{r['val_error']:>7.4f} {r['test_error']:>8.4f}")
    baseline = pareto_rows(c, default_budgets(c) + [budget], prune=prune, method="greedy", n_models=n_models)
    progress(compare_methods(c, sorted(default_budgets(c) + [budget]), prune=prune, n_models=n_models))
    png = plot(c, {"SMOBF": rows, f"forward greedy ({n_models} models)": baseline},
               library / "pareto.png", f"{len(c.numbers)} models: SMOBF vs forward greedy")
    progress(f"plot: {png}")
    chosen = choose(c, budget, method=options.method, prune=prune, n_models=n_models, combiner=options.combiner)
    for line in report(c, chosen, single):
        progress(line)
    chosen, points = in_front_order(c, chosen)
    for line in front_report(c, chosen, points, prune, options.combiner):
        progress(line)
    files = [c.model_files(library, c.numbers.index(n)) for n in chosen.numbers]
    names = {n: [f"{trial_dir(library, n).name}" + (f"_{p.stem}" if len(fs) > 1 else "") for p in fs]
             for n, fs in zip(chosen.numbers, files)}
    weights = None if chosen.weights is None else [w / len(fs) for w, fs in zip(chosen.weights, files) for _ in fs]
    front = [FrontPoint(tuple(x for n in chosen.numbers[:k] for x in names[n]), cost_s=p.cost, val_error=p.error,
                        val_loss=p.loss) for k, p in enumerate(points, 1)]
    export_members(library, [x for n in chosen.numbers for x in names[n]], [p for fs in files for p in fs],
                   options.model_repository, options.ensemble, progress=progress, weights=weights,
                   combiner=chosen.combiner, front=front)
    return chosen, budget


def in_front_order(c: Candidates, chosen: Chosen) -> tuple[Chosen, list]:
    """``chosen`` with its members in their nested order (``selection.nested_order``) and each
    prefix measured on the validation predictions (``selection.prefix_points``)."""
    at = [c.numbers.index(n) for n in chosen.numbers]
    weights = None if chosen.weights is None else np.asarray(chosen.weights)
    order = nested_order(c.val_preds[at], c.labels, c.costs[at], combiner=chosen.combiner, weights=weights)
    points = prefix_points(c.val_preds[at], c.labels, c.costs[at], order, chosen.combiner, weights)
    ordered = replace(chosen, numbers=[chosen.numbers[k] for k in order],
                      weights=None if weights is None else [chosen.weights[k] for k in order])
    return ordered, points


def front_report(c: Candidates, chosen: Chosen, points: list, prune: float, combiner: str) -> list[str]:
    """The front the ensemble is served with (its nested prefixes) beside SMOBF's own choice at each
    prefix's cost: what nesting costs in validation loss and held-out error, if anything."""
    if len(points) < 2:
        return []
    at = [c.numbers.index(n) for n in chosen.numbers]
    weights = None if chosen.weights is None else np.asarray(chosen.weights)
    held = prefix_points(c.test_preds[at], c.test_labels, c.costs[at], list(range(len(at))), chosen.combiner,
                         weights)
    lines = ["front (nested: each point adds members to the one before), against SMOBF's choice at the same cost:",
             f"{'members':>7} {'cost s':>8} {'val loss':>8} {'val err':>7} {'test err':>8} | SMOBF: "
             f"{'members':>7} {'val loss':>8} {'test err':>8}"]
    for p, h in zip(points, held):
        try:
            own = choose(c, p.cost * (1 + 1e-9), prune=prune, combiner=combiner)
            smobf = f"{len(own.numbers):>7} {own.selection.loss:>8.4f} {own.test_error:>8.4f}"
        except ValueError:
            smobf = "-"
        lines.append(f"{len(p.members):>7} {p.cost:>8.4f} {p.loss:>8.4f} {p.error:>7.4f} {h.error:>8.4f} | "
                     f"SMOBF: {smobf}")
    return lines


def report(c: Candidates, chosen: Chosen, single: dict) -> list[str]:
    """What the chosen ensemble does on the held-out test split against its best member (k-fold: on
    the test rows' out-of-fold predictions), and why it has one member, if it does."""
    at = [c.numbers.index(n) for n in chosen.numbers]
    held = [(cross_entropy(c.test_preds[k], c.test_labels), error_rate(c.test_preds[k], c.test_labels), c.numbers[k])
            for k in at]
    loss, error, number = min(held)  # the member best on the held-out rows: the strictest comparison
    lines = [f"held out: ensemble test error {chosen.test_error:.4f}, log loss {chosen.test_loss:.4f}; its best member "
             f"(trial {number}) {error:.4f}, {loss:.4f}; the best single candidate (trial {single['number']}, "
             f"by validation loss) {single['test_error']:.4f}, {single['test_loss']:.4f}"]
    if len(c.numbers) == 1:
        lines.append("the selection kept one member: the library has no other candidate")
    elif len(at) == 1 and chosen.considered == 1:
        lines.append(f"the selection kept one member: of the library's {len(c.numbers)} candidates only one fits "
                     "the budget among the top --prune fraction by validation loss")
    elif len(at) == 1:
        lines.append(f"the selection kept one member: no other candidate lowered the validation log loss on the "
                     f"{len(c.labels)} validation predictions when averaged in (within the budget)")
    return lines
