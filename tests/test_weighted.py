"""Weighted ensembles (Caruana's selection with replacement gives weights): the repository's
``enserve.weights``, the combiner's known answers, and a daemon serving the weighted mean, with
entropy and member variance weighted the same way, against ONNX Runtime run directly."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from enserve import combiners
from enserve.server.errors import RepositoryError
from enserve.server.served.repository import (
    ensemble_config,
    load_repository,
    read_config,
    write_config,
)
from tests.conftest import copy_repo, images, shm_objects, start_daemon

WEIGHTS = (4.0, 2.0, 1.0, 1.0)  # normalised by the daemon: 0.5, 0.25, 0.125, 0.125


def test_weighted_sums_give_the_weighted_mean_entropy_and_variance():
    a, b = np.array([[0.8, 0.2]]), np.array([[0.2, 0.8]])
    w = (0.75, 0.25)
    totals = [w[0] * a + w[1] * b]  # what workers write for a WEIGHTED task
    squares = w[0] * a**2 + w[1] * b**2
    (mean,), entropy, variance = combiners.answer(totals, squares, 1.0, combiners.space_id("identity"),
                                                  [np.dtype(np.float32)])
    np.testing.assert_allclose(mean, [[0.65, 0.35]])
    np.testing.assert_allclose(entropy, [[-(0.65 * np.log(0.65) + 0.35 * np.log(0.35))]], rtol=1e-6)
    # weighted variance per class: 0.75*0.64 + 0.25*0.04 - 0.65^2 = 0.0675 (and the same for class 1)
    np.testing.assert_allclose(variance, [[0.0675]], rtol=1e-6)


def weighted_repo(demo_repo, tmp_path, weights: str):
    repo = copy_repo(demo_repo, tmp_path)
    cfg = read_config(repo / "ensemble" / "config.pbtxt")
    cfg.parameters["enserve.combiner"].string_value = "weighted_mean"
    cfg.parameters["enserve.weights"].string_value = weights
    write_config(repo / "ensemble", cfg)
    return repo


@pytest.mark.parametrize("weights,message", [
    ("1,2", "enserve.weights has 2 values for 4 members"),
    ("1,x,1,1", "is not a comma-separated list of numbers"),
    ("0,0,0,0", "must be finite, >= 0 and not all 0"),
    ("1,-1,1,1", "must be finite, >= 0 and not all 0"),
])
def test_bad_weights_are_named(demo_repo, tmp_path, weights, message):
    with pytest.raises(RepositoryError, match=message):
        load_repository(weighted_repo(demo_repo, tmp_path, weights))


def test_weights_for_a_combiner_that_takes_none_are_refused(demo_repo, tmp_path):
    repo = weighted_repo(demo_repo, tmp_path, "1,1,1,1")
    cfg = read_config(repo / "ensemble" / "config.pbtxt")
    cfg.parameters["enserve.combiner"].string_value = "majority_vote"
    write_config(repo / "ensemble", cfg)
    with pytest.raises(RepositoryError, match="combiner 'majority_vote' takes no weights, but the config sets "
                                              "enserve.weights; use one of \\['weighted_mean'\\]"):
        load_repository(repo)


def test_weights_round_trip_through_config(demo_repo, tmp_path):
    repo = load_repository(weighted_repo(demo_repo, tmp_path, ",".join(map(str, WEIGHTS))))
    spec = repo.ensembles["ensemble"]
    assert spec.combiner == "weighted_mean" and spec.weights == (0.5, 0.25, 0.125, 0.125)
    cfg = ensemble_config(spec, repo.members)
    assert cfg.parameters["enserve.weights"].string_value == "0.5,0.25,0.125,0.125"


def test_a_weighted_ensemble_is_served_as_the_weighted_mean(demo_repo, member_sessions, tmp_path):
    repo = weighted_repo(demo_repo, tmp_path, ",".join(map(str, WEIGHTS)))
    names = load_repository(repo).ensembles["ensemble"].members
    w = np.array(WEIGHTS) / sum(WEIGHTS)
    daemon = start_daemon(repo, tmp_path)
    try:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        for n in (1, 5, 64):
            x = images(n, seed=n)
            per_member = np.array([member_sessions[m].run(None, {"input": x})[0] for m in names])
            expected = np.tensordot(w, per_member, axes=1)
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("ensemble", [inp])
            np.testing.assert_allclose(result.as_numpy("probs"), expected, atol=1e-5)
            entropy = -(expected * np.log(np.clip(expected, 1e-12, None))).sum(1, keepdims=True)
            np.testing.assert_allclose(result.as_numpy("entropy"), entropy, atol=1e-5)
            variance = np.clip(np.tensordot(w, per_member**2, axes=1) - expected**2, 0, None).mean(1, keepdims=True)
            np.testing.assert_allclose(result.as_numpy("member_variance"), variance, atol=1e-6)
            member = client.infer(names[0], [inp]).as_numpy("probs")  # a member alone is not weighted
            np.testing.assert_allclose(member, per_member[0], atol=1e-5)
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []


def test_caruana_choice_keeps_its_repeats_as_weights():
    """Model 0 is right with confidence on the first samples, model 1 on the last: Caruana's
    selection with replacement settles on 46 picks of 0 and 4 of 1, the mixture a grid search over
    the weight finds best (a validation loss of 0.2665, below either alone: 0.2675 and 0.3993); the
    choice keeps them as weights and costs each model once."""
    from enserve.tuning.build import choose
    from enserve.tuning.library import Candidates

    a = np.array([[0.99, 0.01], [0.99, 0.01], [0.5, 0.5], [0.3, 0.7]])
    b = np.array([[0.5, 0.5], [0.5, 0.5], [0.1, 0.9], [0.1, 0.9]])
    flat = np.full((4, 2), 0.5)
    y = np.array([0, 0, 1, 1])
    preds = np.stack([a, b, flat])
    c = Candidates([10, 11, 12], preds, preds, np.array([1.0, 1.0, 1.0]), np.array([0.27, 0.40, 0.69]), y, y)
    chosen = choose(c, 10.0, method="caruana", prune=1.0)
    # the independent reference: the best mixture of models 0 and 1 on a grid of 1001 weights
    from enserve.tuning.selection import cross_entropy

    grid = np.linspace(0, 1, 1001)
    best = grid[np.argmin([cross_entropy(w * a + (1 - w) * b, y) for w in grid])]
    assert chosen.numbers == [10, 11] and chosen.weights == pytest.approx([best, 1 - best], abs=1 / 50)
    assert chosen.weights == pytest.approx([0.92, 0.08])
    assert chosen.cost == 2.0 and chosen.selection.loss == pytest.approx(0.26652249716, rel=1e-9)
    assert choose(c, 10.0, method="smobf", prune=1.0).weights is None  # no repeats: a plain mean


def test_import_writes_a_weighted_ensemble(demo_repo, tmp_path):
    from enserve.server.served.importer import import_onnx

    files = sorted(demo_repo.glob("cnn_*/1/model.onnx"))[:2]
    repo = import_onnx(files, tmp_path / "repo", names=["a", "b"], weights=[0.92, 0.08])
    spec = repo.ensembles["ensemble"]
    assert spec.combiner == "weighted_mean" and spec.weights == pytest.approx((0.92, 0.08))
