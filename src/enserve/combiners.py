"""How an ensemble combines its members' outputs: the one registry that every stage reads. The
selection combines cached predictions with it, the repository takes the names it knows, the workers
add each member's term to the running sums, and the answer finishes those sums.

A combiner works in a *space*: each member's output y becomes a term ``forward(y)`` (weighted by the
member's weight when the combiner is weighted), the terms are summed (the workers do that, in shared
memory), and the sum divided by the sum of the weights goes back through ``inverse``:

    combined = inverse(sum_i w_i forward(y_i) / sum_i w_i)

The arithmetic mean works in the identity space, a majority vote in the space of one-hot votes.
The uncertainty outputs come from the same sums: the predictive entropy of the combined output, and
the members' variance, E_w[t^2] - E_w[t]^2 of their terms t, averaged over the classes.

Adding a combiner means adding it (and, if it needs one, its space) here; nothing else changes
(a task's flags carry a space's index to the workers in ``protocol.SPACE_BITS`` bits). A combiner
must be of that form, an inverse of a weighted mean of terms: a median or a trimmed mean would need
every member's output kept, not a running sum.
Pure numpy, no I/O: every stage can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

EPS = 1e-12
DEFAULT = "mean"  # an ensemble's combiner when its config names none


def _identity(y: np.ndarray) -> np.ndarray:
    return y


def _log(y: np.ndarray) -> np.ndarray:
    """log y in float64 (float16's log of ``EPS`` would be -inf), 0 clipped at ``EPS``."""
    return np.log(np.clip(np.asarray(y, dtype=np.float64), EPS, None))


def _normalised_exp(mean_log: np.ndarray) -> np.ndarray:
    """exp of the mean log, rescaled so that each sample's outputs sum to 1 (a distribution again);
    the row's largest value is taken out first, so nothing underflows (in float64)."""
    flat = np.asarray(mean_log, dtype=np.float64).reshape(len(mean_log), -1)
    e = np.exp(flat - flat.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).reshape(mean_log.shape)


def _one_hot_vote(y: np.ndarray) -> np.ndarray:
    """Each sample's vote: 1 at its largest output, shared equally between tied largest outputs; a
    sample with a NaN output votes NaN (as it would show in a mean), never a plausible class."""
    flat = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    top = flat == flat.max(axis=1, keepdims=True)  # a NaN row: its max is NaN, nothing equals it
    with np.errstate(invalid="ignore", divide="ignore"):
        votes = top / top.sum(axis=1, keepdims=True)
    return votes.reshape(y.shape)


@dataclass(frozen=True)
class Space:
    """Where a combiner averages: members' outputs go in through ``forward``, the average comes out
    through ``inverse``. Its index in ``SPACES`` is what a task's flags carry to the workers."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]
    over_classes: bool = False  # reads each output as one probability vector (needs >= 2 classes)


SPACES: tuple[Space, ...] = (
    Space("identity", _identity, _identity),
    Space("vote", _one_hot_vote, _identity, over_classes=True),
    Space("log", _log, _normalised_exp, over_classes=True),
)


@dataclass(frozen=True)
class Combiner:
    name: str
    space: str  # the name of its ``Space``
    weighted: bool = False  # members carry weights (``enserve.weights``, normalised to sum 1)
    doc: str = ""

    @property
    def space_id(self) -> int:
        return space_id(self.space)

    @property
    def over_classes(self) -> bool:
        """Whether it reads each output as a probability vector over classes (a vote, a geometric
        mean), rather than value by value (a mean)."""
        return SPACES[self.space_id].over_classes

    def terms(self, preds: np.ndarray) -> np.ndarray:
        """(members, samples, ...) predictions as terms of its space, in float64: what the selection
        sums (``finish`` turns a sum of them back into an answer)."""
        forward = SPACES[self.space_id].forward
        return np.stack([np.asarray(forward(np.asarray(p, dtype=np.float64)), dtype=np.float64) for p in preds])

    def finish(self, total: np.ndarray, weight_sum: float) -> np.ndarray:
        return finish(total, weight_sum, self.space_id)

    def combine(self, preds: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
        """(members, samples, ...) predictions combined into (samples, ...): what the served ensemble
        answers for the same members, from the same sums."""
        if self.weighted:
            if weights is None or len(weights) != len(preds) or np.any(np.asarray(weights) < 0) \
                    or np.sum(weights) <= 0:
                raise ValueError(f"combiner '{self.name}' needs {len(preds)} non-negative weights with a positive "
                                 f"sum, got {weights}")
            w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        else:
            w = np.ones(len(preds))
        return self.finish(np.tensordot(w, self.terms(preds), axes=1), float(w.sum()))


COMBINERS: dict[str, Combiner] = {c.name: c for c in (
    Combiner("mean", "identity", doc="the arithmetic mean of the members' outputs (the default)"),
    Combiner("weighted_mean", "identity", weighted=True,
             doc="sum of w_i y_i with weights from enserve.weights (Caruana's selection writes them)"),
    Combiner("majority_vote", "vote", doc="the share of members whose largest output is each class (a member "
                                          "whose largest outputs tie splits its vote)"),
    Combiner("geometric_mean", "log", doc="the normalised geometric mean of the members' probabilities (its "
                                          "member_variance is that of their log-probabilities)"),
)}


def get(name: str) -> Combiner:
    """The combiner called ``name``; ValueError naming the ones there are."""
    try:
        return COMBINERS[name]
    except KeyError:
        raise ValueError(f"combiner '{name}' is not one of {sorted(COMBINERS)}") from None


def unweighted() -> list[str]:
    """The combiners whose members carry no weights: what a user names for a selection."""
    return sorted(c.name for c in COMBINERS.values() if not c.weighted)


def weighted() -> list[str]:
    """The combiners whose members carry weights (``enserve.weights``)."""
    return sorted(c.name for c in COMBINERS.values() if c.weighted)


def weighted_twin(name: str) -> Combiner:
    """The weighted combiner in the space of ``name`` (a selection that repeats members weighs
    them); ValueError if that space has none."""
    space = get(name).space
    for c in COMBINERS.values():
        if c.space == space and c.weighted:
            return c
    raise ValueError(f"combiner '{name}' has no weighted form (a weighted combiner in space '{space}'), so members "
                     f"cannot carry weights; weighted combiners: {weighted()}")


def space_id(name: str) -> int:
    for k, space in enumerate(SPACES):
        if space.name == name:
            return k
    raise ValueError(f"space '{name}' is not one of {[s.name for s in SPACES]}")


def member_terms(values: Sequence[np.ndarray], space: int, weight: float | None = None,
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """What one member adds to its group's running sums (a worker's work): each output's term in
    ``space`` and the first one's square, both times ``weight`` when the combiner is weighted."""
    terms = [SPACES[space].forward(v) for v in values]
    square = np.square(terms[0])
    if weight is not None:
        terms = [t * t.dtype.type(weight) for t in terms]
        square = square * square.dtype.type(weight)
    return terms, square


def finish(total: np.ndarray, weight_sum: float, space: int) -> np.ndarray:
    """The combined output from the sum of the members' terms and the sum of their weights."""
    if weight_sum <= 0:
        raise ValueError(f"the members' weights add up to {weight_sum}, but must be > 0")
    return SPACES[space].inverse(total / weight_sum)


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Predictive entropy per sample, -sum p log p over the classes: shape (batch, 1)."""
    p = probabilities.reshape(len(probabilities), -1)
    return -(p * np.log(np.clip(p, EPS, None))).sum(axis=1, keepdims=True)


def member_variance(total: np.ndarray, total_squares: np.ndarray, weight_sum: float) -> np.ndarray:
    """The members' variance in the combiner's space, E_w[t^2] - E_w[t]^2 from the sums of their
    terms and squared terms, averaged over the classes: shape (batch, 1)."""
    mean_t = total.reshape(len(total), -1) / weight_sum
    var = total_squares.reshape(len(total_squares), -1) / weight_sum - np.square(mean_t)
    return np.clip(var, 0.0, None).mean(axis=1, keepdims=True)


def answer(totals: Sequence[np.ndarray], total_squares: np.ndarray, weight_sum: float, space: int,
           dtypes: Sequence[np.dtype], uncertainty: bool = True,
           ) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray | None]:
    """Every output combined (in its dtype), and the entropy and member variance of the first (None
    for both when ``uncertainty`` is off: nobody asked for them)."""
    combined = [finish(t, weight_sum, space) for t in totals]
    cast = [c.astype(d, copy=False) for c, d in zip(combined, dtypes)]
    if not uncertainty:
        return cast, None, None
    return (cast, entropy(combined[0]).astype(np.float32),
            member_variance(totals[0], total_squares, weight_sum).astype(np.float32))
