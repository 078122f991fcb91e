"""The combiner registry with exact answers: what each combiner makes of member outputs, the same
whether computed at once (selection) or from the workers' running sums of terms (the answer)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from enserve import combiners

A = np.array([[0.5, 0.5], [1.0, 0.0]])
B = np.array([[0.1, 0.9], [0.0, 1.0]])


def served(name: str, preds: list[np.ndarray], weights: list[float] | None = None):
    """What the daemon answers: workers add each member's term (scaled by its weight), the answer
    finishes the sums (as ``request._combine`` does)."""
    c = combiners.get(name)
    added = [combiners.member_terms([p], c.space_id, w if c.weighted else None)
             for p, w in zip(preds, weights or [None] * len(preds))]
    weight_sum = 1.0 if c.weighted else len(preds)
    (out,), entropy, variance = combiners.answer([sum(t[0] for t, _ in added)], sum(sq for _, sq in added),
                                                 weight_sum, c.space_id, [np.dtype(np.float64)])
    return out, entropy, variance


def test_the_mean_its_entropy_and_the_members_variance():
    out, entropy, variance = served("mean", [A, B])
    np.testing.assert_allclose(out, [[0.3, 0.7], [0.5, 0.5]])
    # entropy of [0.3, 0.7] and of [0.5, 0.5] (= ln 2)
    np.testing.assert_allclose(entropy[:, 0], [-(0.3 * math.log(0.3) + 0.7 * math.log(0.7)), math.log(2)])
    # ((0.5-0.3)^2 + (0.1-0.3)^2) / 2 = 0.04 for both classes; second row 0.25
    np.testing.assert_allclose(variance[:, 0], [0.04, 0.25])
    np.testing.assert_allclose(combiners.get("mean").combine(np.stack([A, B])), out)
    assert combiners.entropy(np.array([[1.0, 0.0]]))[0, 0] == 0.0  # certain: no entropy
    assert served("mean", [A, A])[2].max() == 0.0  # identical members: no variance


def test_the_weighted_mean_normalises_its_weights():
    out, _, variance = served("weighted_mean", [A, B], [0.75, 0.25])
    np.testing.assert_allclose(out, 0.75 * A + 0.25 * B)
    # E_w[y^2] - E_w[y]^2 with w = (0.75, 0.25): row 1, class 0: 0.75*0.25 + 0.25*0.01 - 0.4^2 = 0.03
    np.testing.assert_allclose(variance[0, 0], 0.03)
    np.testing.assert_allclose(combiners.get("weighted_mean").combine(np.stack([A, B]), [3, 1]), out)
    with pytest.raises(ValueError, match="needs 2 non-negative weights"):
        combiners.get("weighted_mean").combine(np.stack([A, B]), [1.0])


def test_the_majority_vote_is_the_share_of_members_voting_for_each_class():
    c = np.array([[0.2, 0.8], [0.9, 0.1]])
    out, _, _ = served("majority_vote", [A, B, c])
    # sample 1: A ties (its vote is split, 1/2 each), B class 1, C class 1; sample 2: class 0, 1, 0
    np.testing.assert_allclose(out, [[0.5 / 3, 2.5 / 3], [2 / 3, 1 / 3]])
    np.testing.assert_allclose(combiners.get("majority_vote").combine(np.stack([A, B, c])), out)
    nan = np.array([[np.nan, 0.2], [0.3, 0.7]])  # a member that outputs NaN does not cast a plausible vote
    out, _, _ = served("majority_vote", [nan, B])
    assert np.isnan(out[0]).all() and np.allclose(out[1], [0, 1])


def test_the_geometric_mean_is_normalised_and_its_variance_is_of_the_log_probabilities():
    out, entropy, variance = served("geometric_mean", [A, B])
    g = np.sqrt(A * B) + 0.0
    g[1] = [math.sqrt(1.0 * 1e-12), math.sqrt(1e-12 * 1.0)]  # log clips 0 at 1e-12
    np.testing.assert_allclose(out, g / g.sum(axis=1, keepdims=True), rtol=1e-9)
    np.testing.assert_allclose(out[0], [math.sqrt(0.05) / (math.sqrt(0.05) + math.sqrt(0.45)),
                                        math.sqrt(0.45) / (math.sqrt(0.05) + math.sqrt(0.45))])
    # the variance of the log-probabilities, averaged over the classes; sample 1:
    # class 0 (ln .5 - ln .1)^2 / 4 = (ln 5)^2 / 4, class 1 (ln .5 - ln .9)^2 / 4 = (ln 1.8)^2 / 4
    np.testing.assert_allclose(variance[0, 0], (math.log(5) ** 2 + math.log(1.8) ** 2) / 8, rtol=1e-6)
    np.testing.assert_allclose(combiners.get("geometric_mean").combine(np.stack([A, B])), out)


def test_the_geometric_mean_of_half_precision_members_with_zeros_is_finite():
    """float16 outputs with exact zeros: the log is taken in float64 (float16 has no 1e-12), and the
    mean log is exponentiated after taking out the row's largest value (nothing underflows)."""
    a = np.array([[0.0, 0.0, 1.0], [0.25, 0.25, 0.5]], np.float16)
    b = np.array([[0.0, 0.5, 0.5], [0.5, 0.25, 0.25]], np.float16)
    out, entropy, variance = served("geometric_mean", [a, b])
    assert np.isfinite(out).all() and np.isfinite(entropy).all() and np.isfinite(variance).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    g = np.sqrt(np.clip(a.astype(np.float64), 1e-12, None) * np.clip(b.astype(np.float64), 1e-12, None))
    np.testing.assert_allclose(out, g / g.sum(axis=1, keepdims=True), rtol=1e-3)
    assert out[0].argmax() == 2


def test_a_task_carries_every_space_of_the_registry():
    """The space bits of a task's flags can name every registered space (a new one that did not fit
    would be refused, never read as another flag)."""
    from enserve.server.protocol import COMBINE, SPACE_MASK, SPACE_SHIFT, WEIGHTED, combine_flags

    for k in range(len(combiners.SPACES)):
        for weighted in (False, True):
            flags = combine_flags(k, weighted)
            assert flags & ~COMBINE == 0 and (flags & SPACE_MASK) >> SPACE_SHIFT == k
            assert bool(flags & WEIGHTED) == weighted
    with pytest.raises(ValueError, match="does not fit"):
        combine_flags((SPACE_MASK >> SPACE_SHIFT) + 1, False)


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="combiner 'median' is not one of") as refused:
        combiners.get("median")
    assert all(f"'{name}'" in str(refused.value) for name in combiners.COMBINERS)
    with pytest.raises(ValueError, match="weights add up to 0"):
        combiners.finish(A, 0.0, 0)
    with pytest.raises(ValueError, match="space 'cube' is not one of"):
        combiners.space_id("cube")


def test_every_combiner_answers_from_sums_what_it_computes_at_once():
    """For each registered combiner: the served answer (terms summed, then finished) equals the
    selection's ``combine`` on the same predictions: the build selects what is served."""
    rng = np.random.default_rng(0)
    preds = rng.dirichlet(np.ones(5), size=(4, 7))  # 4 members, 7 samples, 5 classes
    weights = [0.1, 0.2, 0.3, 0.4]
    for name, c in combiners.COMBINERS.items():
        out, entropy, variance = served(name, list(preds), weights if c.weighted else None)
        np.testing.assert_allclose(out, c.combine(preds, weights if c.weighted else None), atol=1e-12,
                                   err_msg=name)
        assert entropy.shape == variance.shape == (7, 1) and (variance >= 0).all(), name


@pytest.mark.parametrize("name", ["geometric_mean", "majority_vote"])
def test_a_served_ensemble_answers_with_its_combiner(name, demo_repo, member_sessions, tmp_path):
    """The daemon serves a combiner named in the ensemble's config: its answer equals the combination
    of the members run directly with ONNX Runtime (numpy, not this module), and so do its uncertainty
    outputs; a member alone is still its own output."""
    import tritonclient.grpc as grpcclient

    from enserve.server.served.repository import read_config, write_config
    from tests.conftest import copy_repo, images, start_daemon

    repo = copy_repo(demo_repo, tmp_path)
    cfg = read_config(repo / "ensemble" / "config.pbtxt")
    cfg.parameters["enserve.combiner"].string_value = name
    write_config(repo / "ensemble", cfg)
    daemon = start_daemon(repo, tmp_path)
    try:
        x = images(5, seed=3)
        outs = np.stack([s.run(None, {"input": x})[0] for s in member_sessions.values()]).astype(np.float64)
        if name == "geometric_mean":
            terms = np.log(np.clip(outs, 1e-12, None))
            g = np.exp(terms.mean(axis=0))
            expected = g / g.sum(axis=1, keepdims=True)
        else:
            terms = np.stack([np.eye(outs.shape[2])[o.argmax(axis=1)] for o in outs])
            expected = terms.mean(axis=0)
        entropy = -(expected * np.log(np.clip(expected, 1e-12, None))).sum(axis=1, keepdims=True)
        variance = terms.var(axis=0).mean(axis=1, keepdims=True)  # of the members' terms, over the classes
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        result = client.infer("ensemble", [inp])
        np.testing.assert_allclose(result.as_numpy("probs"), expected, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("entropy"), entropy, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("member_variance"), variance, rtol=1e-3, atol=1e-5)
        member = next(iter(member_sessions))
        np.testing.assert_allclose(client.infer(member, [inp]).as_numpy("probs"), outs[0], atol=1e-6)
    finally:
        assert daemon.stop() == 0


def test_a_combiner_over_classes_refuses_an_output_of_one_value(tmp_path):
    """A vote or a geometric mean reads an output as a probability vector: a single sigmoid output
    (one value a sample) would always answer 1, so such an ensemble is refused, naming the output."""
    import onnx
    from onnx import TensorProto, helper

    from enserve.server.errors import RepositoryError
    from enserve.server.served.importer import import_onnx
    from enserve.server.served.repository import load_repository, read_config, write_config

    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["prob"])], "sigmoid",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    files = []
    for k in range(2):
        files.append(tmp_path / f"s{k}.onnx")
        onnx.save(model, files[-1])
    repo = tmp_path / "repo"
    import_onnx(files, repo)  # the mean of one value a sample is fine
    for name in ("majority_vote", "geometric_mean"):
        cfg = read_config(repo / "ensemble" / "config.pbtxt")
        cfg.parameters["enserve.combiner"].string_value = name
        write_config(repo / "ensemble", cfg)
        with pytest.raises(RepositoryError, match=f"combiner '{name}' reads each output as a probability vector "
                                                  "over classes, but output 'prob' has 1 value"):
            load_repository(repo)
