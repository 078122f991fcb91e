"""Ensemble selection over cached predictions (paper §2.1): pure functions, no models, no I/O.

``preds`` is (models, samples, classes) validation probabilities, ``labels`` (samples,) class
ids, ``costs`` (models,) inference costs (the paper's C: time to predict a fixed number of
samples), ``budget`` the largest total cost allowed, ``combiner`` the name of the combiner the
ensemble is served with (``enserve.combiners``): candidates are scored by the answer it would
give, from the running sum of the members' terms, as the served ensemble computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from enserve import combiners

SMOBF_WEIGHTS = (0.1, 0.01, 0.001)


@dataclass(frozen=True)
class Selection:
    """Chosen models (indices; a repeated index weighs more) with the ensemble's loss and cost."""

    members: tuple[int, ...]
    loss: float
    cost: float
    method: str

    @property
    def weights(self) -> dict[int, float]:
        counts: dict[int, int] = {}
        for m in self.members:
            counts[m] = counts.get(m, 0) + 1
        return {m: c / len(self.members) for m, c in counts.items()}


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, combiners.EPS, 1.0))))


def error_rate(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) != labels))


def ensemble_cost(members, costs: np.ndarray) -> float:
    """Each distinct member runs once, however often it is repeated."""
    return float(sum(costs[m] for m in set(members)))


def prune_top(losses: np.ndarray, fraction: float = 0.2) -> np.ndarray:
    """Indices of the best ``fraction`` of models by validation loss (at least one), best first."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the pruning fraction is {fraction}, but must be in (0, 1]")
    keep = max(1, math.ceil(fraction * len(losses)))
    return np.argsort(losses, kind="stable")[:keep]


def _check(preds: np.ndarray, labels: np.ndarray, costs: np.ndarray | None) -> None:
    if preds.ndim != 3 or preds.shape[1] != len(labels):
        raise ValueError(f"predictions of shape {preds.shape} do not match {len(labels)} labels")
    if costs is not None and len(costs) != len(preds):
        raise ValueError(f"{len(costs)} costs for {len(preds)} models")


def _best_addition(terms: np.ndarray, labels: np.ndarray, chosen: list[int], total: np.ndarray,
                   costs: np.ndarray, budget: float, rule: combiners.Combiner, *,
                   repeat: bool) -> tuple[int | None, float]:
    """The model whose addition to ``chosen`` (running sum of terms ``total``) gives the lowest loss
    within budget."""
    best, best_loss = None, math.inf
    for m in range(len(terms)):
        if (not repeat and m in chosen) or ensemble_cost(chosen + [m], costs) > budget:
            continue
        cand = cross_entropy(rule.finish(total + terms[m], len(chosen) + 1), labels)
        if cand < best_loss:
            best, best_loss = m, cand
    return best, best_loss


def forward_greedy(
    preds: np.ndarray,
    labels: np.ndarray,
    n_models: int,
    costs: np.ndarray | None = None,
    budget: float = math.inf,
    combiner: str = combiners.DEFAULT,
) -> Selection:
    """Baseline: add, without replacement, the model whose addition gives the lowest validation loss,
    until ``n_models`` models are in (or none fits the budget)."""
    _check(preds, labels, costs)
    costs = np.zeros(len(preds)) if costs is None else np.asarray(costs, dtype=np.float64)
    rule = combiners.get(combiner)
    terms = rule.terms(preds)
    chosen: list[int] = []
    total = np.zeros(preds.shape[1:])
    loss = math.inf
    while len(chosen) < n_models:
        best, best_loss = _best_addition(terms, labels, chosen, total, costs, budget, rule, repeat=False)
        if best is None:
            break
        chosen.append(best)
        total += terms[best]
        loss = best_loss
    return Selection(tuple(chosen), loss, ensemble_cost(chosen, costs), f"forward greedy ({n_models})")


def smobf(preds: np.ndarray, labels: np.ndarray, costs: np.ndarray, budget: float, w: float,
          combiner: str = combiners.DEFAULT) -> Selection:
    """SMOBF greedy with one weight: add the model minimising
    ``(1-w) E(y_a, y) + w C_a / B + P_a`` while that score improves (P_a: excluded over budget)."""
    _check(preds, labels, costs)
    if budget <= 0:
        raise ValueError(f"the budget is {budget}, but must be > 0")
    costs = np.asarray(costs, dtype=np.float64)
    rule = combiners.get(combiner)
    terms = rule.terms(preds)
    chosen: list[int] = []
    total = np.zeros(preds.shape[1:])
    score, loss = math.inf, math.inf
    while True:
        best, best_score, best_loss = None, score, loss
        for m in range(len(preds)):
            if m in chosen:
                continue
            cost = ensemble_cost(chosen + [m], costs)
            if cost > budget:  # P_a: an arbitrarily large penalty
                continue
            cand_loss = cross_entropy(rule.finish(total + terms[m], len(chosen) + 1), labels)
            cand = (1 - w) * cand_loss + w * cost / budget
            if cand < best_score:
                best, best_score, best_loss = m, cand, cand_loss
        if best is None:
            break
        chosen.append(best)
        total += terms[best]
        score, loss = best_score, best_loss
    return Selection(tuple(chosen), loss, ensemble_cost(chosen, costs), f"SMOBF (w={w:g})")


def smobf_best(preds: np.ndarray, labels: np.ndarray, costs: np.ndarray, budget: float,
               weights=SMOBF_WEIGHTS, combiner: str = combiners.DEFAULT) -> Selection:
    """SMOBF run for every weight; the ensemble with the lowest validation loss within budget."""
    runs = [smobf(preds, labels, costs, budget, w, combiner) for w in weights]
    runs = [r for r in runs if r.members]
    if not runs:
        raise ValueError(f"no model fits the budget {budget} (cheapest costs {float(np.min(costs)):g})")
    return min(runs, key=lambda r: r.loss)


def caruana(preds: np.ndarray, labels: np.ndarray, n_iterations: int = 50,
            costs: np.ndarray | None = None, budget: float = math.inf,
            combiner: str = combiners.DEFAULT) -> Selection:
    """Caruana et al.'s selection with replacement: each step adds the model (possibly again) that
    lowers the loss of the running combination most; the best prefix is returned (a member picked k
    times weighs k: served by ``combiner``'s weighted twin)."""
    _check(preds, labels, costs)
    costs = np.zeros(len(preds)) if costs is None else np.asarray(costs, dtype=np.float64)
    rule = combiners.get(combiner)
    terms = rule.terms(preds)
    chosen: list[int] = []
    total = np.zeros(preds.shape[1:])
    best_prefix, best_loss = 0, math.inf
    for _ in range(n_iterations):
        step, step_loss = _best_addition(terms, labels, chosen, total, costs, budget, rule, repeat=True)
        if step is None:
            break
        chosen.append(step)
        total += terms[step]
        if step_loss < best_loss:
            best_prefix, best_loss = len(chosen), step_loss
    members = tuple(chosen[:best_prefix])
    return Selection(members, best_loss, ensemble_cost(members, costs), "Caruana with replacement")


@dataclass(frozen=True)
class Prefix:
    """One prefix of a nested order: its members (indices), cost and loss and error on the predictions given."""

    members: tuple[int, ...]
    cost: float
    loss: float
    error: float


def nested_order(preds: np.ndarray, labels: np.ndarray, costs: np.ndarray, w: float = SMOBF_WEIGHTS[0],
                 combiner: str = combiners.DEFAULT, weights: np.ndarray | None = None) -> list[int]:
    """Every model of ``preds`` (an ensemble's members) in the order SMOBF's score adds them when the
    budget is their total cost B: each step adds the model minimising ``(1-w) E + w C / B`` of the
    prefix, and none is left out. Each prefix is then an ensemble the server can answer with, and a
    richer one holds every member of a poorer one (SMOBF's own points at different budgets need not).
    ``weights`` (a weighted ensemble's): each prefix combines its members with theirs."""
    _check(preds, labels, costs)
    costs = np.asarray(costs, dtype=np.float64)
    budget = float(costs.sum()) or 1.0
    rule, weights = combiners.get(combiner), _weights(weights, len(preds))
    terms = rule.terms(preds) * weights.reshape(-1, *[1] * (preds.ndim - 1))
    chosen: list[int] = []
    total = np.zeros(preds.shape[1:])
    while len(chosen) < len(preds):
        scores = {m: (1 - w) * cross_entropy(rule.finish(total + terms[m], weights[chosen + [m]].sum()), labels)
                  + w * ensemble_cost(chosen + [m], costs) / budget for m in range(len(preds)) if m not in chosen}
        best = min(scores, key=lambda m: (scores[m], m))
        chosen.append(best)
        total += terms[best]
    return chosen


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,) or np.any(weights < 0):
        raise ValueError(f"weights {weights.tolist()} must be {n} values >= 0")
    return weights


def prefix_points(preds: np.ndarray, labels: np.ndarray, costs: np.ndarray, order: list[int],
                  combiner: str = combiners.DEFAULT, weights: np.ndarray | None = None) -> list[Prefix]:
    """Each prefix of ``order`` measured as the server would answer with it: cost, loss, error."""
    _check(preds, labels, costs)
    rule, weights = combiners.get(combiner), _weights(weights, len(preds))
    terms = rule.terms(preds)
    total = np.zeros(preds.shape[1:])
    points = []
    for k, m in enumerate(order, 1):
        total = total + weights[m] * terms[m]
        answer = rule.finish(total, weights[order[:k]].sum())
        points.append(Prefix(tuple(order[:k]), ensemble_cost(order[:k], np.asarray(costs)),
                                 cross_entropy(answer, labels), error_rate(answer, labels)))
    return points
