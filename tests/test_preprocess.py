"""Preprocessing learned from the training split and exported inside each member: known answers
against scikit-learn's imputer and scaler, and the exported graph on raw inputs against the trained
network on transformed inputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the 'tune' extra is not installed")

from enserve.tuning import preprocess  # noqa: E402
from enserve.tuning.families import families_for  # noqa: E402


def raw_rows(n: int = 200, seed: int = 0) -> np.ndarray:
    """Columns of very different scales (0.001 to thousands), some values missing."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.normal(0.003, 0.001, n), rng.normal(1500, 400, n), rng.integers(0, 5, n),
                  rng.normal(-20, 3, n)], axis=1).astype(np.float32)
    x[rng.random(n) < 0.1, 1] = np.nan
    x[rng.random(n) < 0.05, 3] = np.nan
    return x


def sklearn_reference(x_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Median imputation, then standard scaling, then a 0/1 column per column that had missing values
    in training: scikit-learn's own classes, fitted on the training rows."""
    from sklearn.impute import MissingIndicator, SimpleImputer
    from sklearn.preprocessing import StandardScaler

    imputer = SimpleImputer(strategy="median").fit(x_train)
    scaler = StandardScaler().fit(imputer.transform(x_train))
    indicator = MissingIndicator(features="missing-only").fit(x_train)
    return np.hstack([scaler.transform(imputer.transform(x)), indicator.transform(x).astype(np.float64)])


def test_per_column_preprocessing_is_scikit_learns_imputer_scaler_and_indicator():
    x_train, x = raw_rows(seed=0), raw_rows(50, seed=1)
    p = preprocess.per_column(x_train)
    assert p.indicate == (1, 3) and p.features_out((4,)) == (6,)
    layer = preprocess.Preprocess(p, (4,))
    got = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, sklearn_reference(x_train, x), rtol=1e-5, atol=1e-5)


def test_per_channel_preprocessing_scales_each_channel():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(0, 255, (20, 1, 8, 8)), rng.normal(5, 0.01, (20, 1, 8, 8))], axis=1)
    p = preprocess.per_channel(x.astype(np.float32))
    out = preprocess.Preprocess(p, (2, 8, 8))(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-3)


def test_the_exported_member_on_raw_inputs_is_the_network_on_transformed_inputs(tmp_path):
    """The ONNX graph a client is served (raw features, NaN for a missing value) equals the trained
    network applied to scikit-learn's transform of the same rows, within 1e-5."""
    import onnxruntime as ort

    from enserve.models.mlp import MLP, MLPConfig
    from enserve.tuning.export import export_onnx

    x_train, x = raw_rows(seed=0), raw_rows(64, seed=2)
    p = preprocess.per_column(x_train)
    torch.manual_seed(0)
    net = MLP(MLPConfig(features=6, classes=3, hidden=(16,), batch_norm=True)).eval()
    model = preprocess.member("mlp", p, net, (4,))
    path = export_onnx(model, (4,), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = session.run(None, {"input": x})[0]
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(sklearn_reference(x_train, x).astype(np.float32))), dim=1).numpy()
    assert np.isnan(x).any() and np.isfinite(served).all()
    np.testing.assert_allclose(served, want, atol=1e-5)
    # an infinite value, or one that overflows when scaled, counts as CLIP standard deviations: an
    # answer, not NaN (the same as the value at exactly that many deviations)
    extreme = x[:4].copy()
    extreme[0, 0], extreme[1, 1], extreme[2, 2], extreme[3, 3] = np.inf, -np.inf, 3e38, -3e38
    at_clip = x[:4].copy()
    for k, sign in enumerate((1, -1, 1, -1)):
        at_clip[k, k] = p.mean[k] + sign * preprocess.CLIP * p.scale[k]
    got = session.run(None, {"input": extreme})[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, session.run(None, {"input": at_clip})[0], atol=1e-5)


def test_a_signal_family_reads_rows_as_one_channel(tmp_path):
    import onnxruntime as ort

    from enserve.models.resnet1d import ResNet1d, ResNet1dConfig
    from enserve.tuning.export import export_onnx

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(30, 40)) * 7 + 3).astype(np.float32)
    p = preprocess.learn_for(("cnn1d",), x)["cnn1d"]
    assert p.kind == "per_channel" and len(p.mean) == 1
    net = ResNet1d(ResNet1dConfig(in_channels=1, classes=3)).eval()
    model = preprocess.member("cnn1d", p, net, (40,))
    path = export_onnx(model, (40,), tmp_path / "m.onnx")
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(((x - x.mean()) / x.std())[:, None, :])), dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_families_follow_the_data_and_say_why():
    rows = np.zeros((10, 40), np.float32)
    assert families_for("tabular", rows, "auto")[0] == ("mlp", "cnn1d")  # could be either: both searched
    assert families_for("tabular", rows, "tabular") == (("mlp",), "--input-kind tabular")
    assert families_for("tabular", rows[:, :13], "auto")[0] == ("mlp",)  # too short for a signal
    with_gaps = rows.copy()
    with_gaps[0, 0] = np.nan
    families, why = families_for("tabular", with_gaps, "auto")
    assert families == ("mlp",) and "missing values" in why
    assert families_for("image", np.zeros((2, 1, 8, 8)), "auto")[0] == ("cnn2d",)
    assert families_for("signal", np.zeros((2, 1, 40)), "signal")[0] == ("cnn1d",)


def test_a_column_missing_in_every_training_row_is_refused():
    x = raw_rows()
    x[:, 2] = np.nan
    with pytest.raises(ValueError, match=r"columns \[2\] have no value in any training row"):
        preprocess.per_column(x)


def test_a_missing_value_in_any_split_keeps_rows_tabular(tmp_path):
    """Rows that could be a signal, with a missing value only in the test rows: the signal family,
    which does not impute, is not searched (it would meet NaN in its predictions)."""
    from enserve.tuning.data import load_dataset

    rng = np.random.default_rng(0)
    x_test = rng.normal(size=(20, 40)).astype(np.float32)
    x_test[3, 7] = np.nan
    np.savez(tmp_path / "rows.npz", x_train=rng.normal(size=(60, 40)).astype(np.float32),
             y_train=np.arange(60) % 2, x_test=x_test, y_test=np.arange(20) % 2)
    data = load_dataset(str(tmp_path / "rows.npz"))
    assert not np.isnan(data.x_train).any()
    assert data.families == ("mlp",) and "missing values" in data.why


def test_labels_are_read_as_users_write_them(tmp_path):
    """CSV labels 1..10 keep their numeric order and lose stray spaces; an npz's labels must be class
    numbers 0..k-1, and say so; a column with no value is refused by its name."""
    from enserve.tuning.data import load_dataset
    from enserve.tuning.search import keep_preprocessing

    rows = ["a,b,label"] + [f"{k},{k % 3},{' ' if k % 2 else ''}{k % 10 + 1}" for k in range(60)]
    (tmp_path / "n.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(str(tmp_path / "n.csv"))
    assert data.class_names == tuple(str(v) for v in range(1, 11))
    (tmp_path / "gap.csv").write_text("a,b,label\n" + "\n".join(f"{k},,{k % 2}" for k in range(40)) + "\n")
    with pytest.raises(ValueError, match="columns 'b' have no value in any training row"):
        keep_preprocessing(tmp_path / "lib", load_dataset(str(tmp_path / "gap.csv")))
    (tmp_path / "nolabel.csv").write_text("a,label\n1,x\n2,\n3,y\n")
    with pytest.raises(ValueError, match=r"rows \[3\] have no label in column 'label'"):
        load_dataset(str(tmp_path / "nolabel.csv"))
    x = np.zeros((40, 3), np.float32)
    for y, match in [(np.arange(40) % 2 + 1, r"classes \[0\] of 0..2 have no row"),
                     (np.arange(40) % 2 + 0.5, "labels must be class numbers 0..k-1, not float64 values like"),
                     (np.array(["a", "b"] * 20), "labels must be class numbers 0..k-1, not <U1 values")]:
        np.savez(tmp_path / "bad.npz", x_train=x, y_train=y)
        with pytest.raises(ValueError, match=match):
            load_dataset(str(tmp_path / "bad.npz"))


def test_splits_that_cannot_train_are_refused_naming_the_split(tmp_path):
    """The hostile review's inputs: each fails at loading, saying what is wrong, instead of killing
    every trial worker with a traceback or training on a label."""
    from enserve.tuning.data import load_dataset

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 1, 20)).astype(np.float32), np.arange(40) % 2
    cases = [
        (dict(x_val=x[:10], y_val=y[:12]), "x_val has 10 rows but 12 labels"),
        (dict(x_test=rng.normal(size=(10, 1, 24)), y_test=y[:10]), r"x_test rows are of shape \(1, 24\), but x_train"),
        (dict(x_test=np.where(np.arange(20) == 3, np.nan, x[:10]), y_test=y[:10]),
         "x_test has 10 NaN or infinite values .* signals must be complete"),
    ]
    for extra, match in cases:
        np.savez(tmp_path / "bad.npz", x_train=x, y_train=y, **extra)
        with pytest.raises(ValueError, match=match):
            load_dataset(str(tmp_path / "bad.npz"))
    for text, match in [("a,b,label\n1,inf,x\n2,3,y\n3,4,x\n4,5,y\n", r"columns \['b'\] hold infinite values"),
                        ("label,a,label\n1,2,3\n", r"columns \['label'\] appear more than once"),
                        ("a,b\n" + "".join(f"{k},{k * 0.37}\n" for k in range(30)),
                         "the last one, 'b', has 30 different values in 30 rows: it does not look like a label"),
                        ("a,label\n1,x\n", r"1 rows \(1 classes\) are too few to set 20% of them aside")]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(ValueError, match=match):
            load_dataset(str(tmp_path / "bad.csv"))
    (tmp_path / "upper.csv").write_text("Label,f1,f2\n" + "".join(f"{'ab'[k % 2]},{k},{k * 0.37}\n" for k in range(30)))
    assert load_dataset(str(tmp_path / "upper.csv")).class_names == ("a", "b")  # 'Label' is the label column
