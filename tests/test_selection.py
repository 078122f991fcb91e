"""Ensemble selection with known answers worked out by hand on tiny prediction arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from enserve.tuning.selection import (
    caruana,
    cross_entropy,
    forward_greedy,
    prune_top,
    smobf,
    smobf_best,
)


def two_class(p_true: list[float], labels: list[int]) -> np.ndarray:
    """(samples, 2) probabilities giving the true class the probability p_true."""
    out = np.zeros((len(labels), 2))
    for i, (p, y) in enumerate(zip(p_true, labels)):
        out[i, y] = p
        out[i, 1 - y] = 1 - p
    return out


LABELS = np.array([0, 0, 1])
# p(true class) per sample: A good everywhere, B mediocre, C wrong on sample 3, D weak on 1-2
A = two_class([0.9, 0.9, 0.9], LABELS)
B = two_class([0.6, 0.6, 0.6], LABELS)
C = two_class([0.99, 0.99, 0.1], LABELS)
D = two_class([0.5, 0.5, 0.99], LABELS)
PREDS = np.stack([A, B, C, D])


def nll(*p):
    return -sum(math.log(x) for x in p) / len(p)


def test_cross_entropy_is_the_mean_nll():
    assert cross_entropy(A, LABELS) == pytest.approx(nll(0.9, 0.9, 0.9))


def test_forward_greedy_fixed_count():
    one = forward_greedy(PREDS, LABELS, n_models=1)
    assert one.members == (0,) and one.loss == pytest.approx(nll(0.9, 0.9, 0.9))
    # A+B: 0.75 everywhere -> 0.2877; A+C: .945,.945,.5 -> 0.2687; A+D: .7,.7,.945 -> 0.2566
    two = forward_greedy(PREDS, LABELS, n_models=2)
    assert two.members == (0, 3) and two.loss == pytest.approx(nll(0.7, 0.7, 0.945))
    # a fixed count is reached even when the loss gets worse
    assert len(forward_greedy(PREDS, LABELS, n_models=4).members) == 4


def test_smobf_respects_the_budget_and_trades_cost():
    costs = np.array([10.0, 1.0, 1.0, 1.0])
    # budget 10: A alone (score .9*.1054+.1*1 = .195) beats every cheap model; A+x is over budget
    assert smobf(PREDS, LABELS, costs, budget=10, w=0.1).members == (0,)
    # budget 3: A is excluded. D first (.9*.4654+.1/3 = .452), then D+C
    # (.9*nll(.745,.745,.545)+.1*2/3 = .425 improves), then D+C+B (.489) does not
    sel = smobf(PREDS, LABELS, costs, budget=3, w=0.1)
    assert sel.members == (3, 2)
    assert sel.loss == pytest.approx(nll(0.745, 0.745, 0.545)) and sel.cost == 2
    best = smobf_best(PREDS, LABELS, costs, budget=3)
    assert best.cost <= 3 and best.loss <= sel.loss
    with pytest.raises(ValueError, match="no model fits the budget 0.5"):
        smobf_best(PREDS, LABELS, costs, budget=0.5)


def test_smobf_weight_makes_cost_matter():
    costs = np.array([3.0, 1.0, 1.0, 1.0])
    # with w=0.9 cost dominates: the cheapest useful model wins over the accurate but costly A
    cheap = smobf(PREDS, LABELS, costs, budget=3, w=0.9)
    accurate = smobf(PREDS, LABELS, costs, budget=3, w=0.001)
    assert 0 not in cheap.members and accurate.members == (0,)


def test_caruana_with_replacement():
    labels = np.array([0, 1])
    a = two_class([0.9, 0.4], labels)
    b = two_class([0.2, 0.9], labels)
    # steps: A (.5108), A again (no gain), B (.4867), A (.4830), then A (.4838) and B (.4944) lose
    sel = caruana(np.stack([a, b]), labels, n_iterations=5)
    assert sel.members == (0, 0, 1, 0)
    assert sel.weights == {0: 0.75, 1: 0.25}
    assert sel.loss == pytest.approx(nll(0.725, 0.525))


def test_the_selection_scores_candidates_as_the_combiner_serves_them():
    """The same library, two combiners, two ensembles: forward greedy adds the second member that
    makes the best mean, or the best geometric mean (computed here with numpy, not the registry)."""
    p0 = np.array([[0.3, 0.7, 0.2], [0.8, 0.1, 0.8], [0.2, 0.4, 0.3]])  # P(class 0) per model and sample
    preds = np.stack([p0, 1 - p0], axis=-1)
    labels = np.array([0, 0, 1])
    by_mean = forward_greedy(preds, labels, 2)
    by_geometric = forward_greedy(preds, labels, 2, combiner="geometric_mean")
    assert by_mean.members == (0, 1) and by_geometric.members == (0, 2)
    assert by_mean.loss == pytest.approx(nll(*((preds[0] + preds[1]) / 2)[np.arange(3), labels]))
    g = np.sqrt(preds[0] * preds[2])
    g /= g.sum(axis=1, keepdims=True)
    assert by_geometric.loss == pytest.approx(nll(*g[np.arange(3), labels]))
    with pytest.raises(ValueError, match="combiner 'median' is not one of"):
        forward_greedy(preds, labels, 2, combiner="median")


def test_prune_top_fraction():
    losses = np.array([0.5, 0.1, 0.3, 0.9, 0.2])
    assert prune_top(losses, 0.4).tolist() == [1, 4]
    assert prune_top(losses, 0.01).tolist() == [1]
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        prune_top(losses, 0)


def test_choose_prunes_among_the_models_that_fit_the_budget():
    from enserve.tuning.build import best_single, choose
    from enserve.tuning.library import Candidates

    preds = np.stack([A, B, C, D])
    losses = np.array([cross_entropy(p, LABELS) for p in preds])  # A 0.105 < D 0.465 < B 0.511 < C 0.775
    lib = Candidates([10, 11, 12, 13], preds, preds, np.array([10.0, 1.0, 1.0, 1.0]), losses, LABELS, LABELS)
    # A (the best) costs 10: with B = 2 the top quarter is taken among B, C, D, i.e. D alone
    chosen = choose(lib, 2.0, prune=0.25)
    assert chosen.numbers == [13] and chosen.cost == 1.0
    assert chosen.selection.loss == pytest.approx(nll(0.5, 0.5, 0.99))
    assert choose(lib, 10.0, prune=0.25).numbers == [10]  # A fits: the top quarter is A
    with pytest.raises(ValueError, match="no model fits the budget 0.5 \\(cheapest costs 1\\)"):
        choose(lib, 0.5)
    assert best_single(lib)["number"] == 10 and best_single(lib, 2.0)["number"] == 13
    assert best_single(lib, 2.0)["test_loss"] == pytest.approx(nll(0.5, 0.5, 0.99))
    assert best_single(lib, 0.5) is None
    # one member kept: why (the top quarter within the budget held one candidate; or none lowered the loss)
    from enserve.tuning.build import report

    assert chosen.considered == 1 and "only one fits the budget among the top --prune fraction" in \
        report(lib, chosen, best_single(lib, 2.0))[-1]
    alone = choose(lib, 1.0, prune=1.0)  # B, C and D fit, one at a time
    assert alone.numbers == [13] and alone.considered == 3 and "no other candidate lowered the validation log loss" in \
        report(lib, alone, best_single(lib))[-1]


def test_the_default_budget_leaves_room_for_about_three_good_models():
    from enserve.tuning.build import default_budget
    from enserve.tuning.library import Candidates

    preds = np.stack([A, B, C, D])
    losses = np.array([0.1, 0.2, 0.3, 0.4])
    lib = Candidates([10, 11, 12, 13], preds, preds, np.array([1.0, 4.0, 8.0, 100.0]), losses, LABELS, LABELS)
    # the best (cost 1) is the cheapest: 3 x the median cost of the top half (1, 4), not 3 x 1
    assert default_budget(lib, prune=0.5) == pytest.approx(3 * 2.5)
    assert default_budget(lib, prune=0.75) == pytest.approx(3 * 4.0)  # top 3: costs 1, 4, 8
    assert default_budget(lib, prune=0.25) == pytest.approx(3 * 1.0)  # the best alone
    costly_best = Candidates([10, 11], preds[:2], preds[:2], np.array([9.0, 1.0]), losses[:2], LABELS, LABELS)
    assert default_budget(costly_best, prune=1.0) == pytest.approx(3 * 9.0)  # at least 3 x the best's cost


def test_the_nested_order_adds_every_member_by_smobfs_score():
    from enserve.tuning.selection import nested_order, prefix_points

    costs = np.array([10.0, 1.0, 1.0, 1.0])  # B = 13
    # 1st: A .9*.1054+.1*10/13 = .1717 beats D .4266; 2nd (cost 11): A+D .2566 < A+C .2688 < A+B .2877;
    # 3rd (cost 12): A+D+C .2884 < A+D+B .3324; B last, though it raises the loss
    order = nested_order(PREDS, LABELS, costs, w=0.1)
    assert order == [0, 3, 2, 1]
    assert nested_order(PREDS, LABELS, costs, w=1.0) == [1, 2, 3, 0]  # cost alone: cheapest first, ties by index
    assert nested_order(PREDS, LABELS, costs, w=0.0)[:2] == [0, 3]  # loss alone: forward greedy's order
    points = prefix_points(PREDS, LABELS, costs, order)
    assert [p.members for p in points] == [(0,), (0, 3), (0, 3, 2), (0, 3, 2, 1)]
    assert [p.cost for p in points] == [10.0, 11.0, 12.0, 13.0]
    assert [p.loss for p in points] == pytest.approx([
        nll(0.9, 0.9, 0.9), nll(0.7, 0.7, 0.945), nll(2.39 / 3, 2.39 / 3, 1.99 / 3), nll(0.7475, 0.7475, 0.6475)])
    assert [p.error for p in points] == [0.0, 0.0, 0.0, 0.0]
    # weighted: D weighs 3 times A, so the pair answers (0.9 + 3 x 0.5) / 4 on the first samples
    weighted = prefix_points(PREDS, LABELS, costs, [0, 3], combiner="weighted_mean", weights=np.array([1, 0, 0, 3.0]))
    assert weighted[1].loss == pytest.approx(nll(0.6, 0.6, (0.9 + 3 * 0.99) / 4))
    with pytest.raises(ValueError, match=r"weights \[1.0, 2.0\] must be 4 values >= 0"):
        nested_order(PREDS, LABELS, costs, weights=np.array([1.0, 2.0]))
