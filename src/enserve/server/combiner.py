"""Combining member outputs (pure numpy, no I/O): sums in, the ensemble's answer out.

Workers add their members' outputs into running sums (and the first output's squares), so the
orchestrator only adds a few partial sums and divides once. From those sums come the mean (or
a weighted mean), the predictive entropy of the mean, and the member variance (disagreement).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-12


def mean(total: np.ndarray, n: float) -> np.ndarray:
    """The average of ``n`` members whose outputs add up to ``total``."""
    if n <= 0:
        raise ValueError(f"member count is {n}, but must be > 0")
    return total / n


def weighted_sum(outputs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i * y_i; with weights summing to 1 this is the weighted mean."""
    if len(outputs) != len(weights) or not outputs:
        raise ValueError(f"{len(outputs)} outputs for {len(weights)} weights; need one weight per output")
    total = np.multiply(outputs[0], weights[0], dtype=np.float64)
    for y, w in zip(outputs[1:], weights[1:]):
        total += np.multiply(y, w, dtype=np.float64)
    return total


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Predictive entropy per sample, -sum p log p over the classes: shape (batch, 1)."""
    p = probabilities.reshape(len(probabilities), -1)
    return -(p * np.log(np.clip(p, EPS, None))).sum(axis=1, keepdims=True)


def member_variance(mean_value: np.ndarray, total_squares: np.ndarray, n: float) -> np.ndarray:
    """Variance across members, E[y^2] - E[y]^2, averaged over the classes: shape (batch, 1)."""
    m = mean_value.reshape(len(mean_value), -1)
    var = total_squares.reshape(len(total_squares), -1) / n - np.square(m)
    return np.clip(var, 0.0, None).mean(axis=1, keepdims=True)


def ensemble_answer(totals: Sequence[np.ndarray], total_squares: np.ndarray, n: int,
                    dtypes: Sequence[np.dtype], uncertainty: bool = True,
                    ) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray | None]:
    """Means of every output (in their dtypes), and the entropy and member variance of the first
    (None for both when ``uncertainty`` is off: nobody asked for them)."""
    means = [mean(t, n) for t in totals]
    cast = [m.astype(d, copy=False) for m, d in zip(means, dtypes)]
    if not uncertainty:
        return cast, None, None
    first = means[0]
    return (cast, entropy(first).astype(np.float32),
            member_variance(first, total_squares, n).astype(np.float32))
