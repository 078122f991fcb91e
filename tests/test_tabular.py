"""Tabular data as users have it: a CSV of raw columns at very different scales, some values
missing, built into an ensemble whose members impute and scale inside their own graphs; clients
send the raw rows. Text columns are refused by name; a continued build keeps its preprocessing."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optuna", reason="the 'tune' extra is not installed")


def write_csv(path: Path, x: np.ndarray, labels, header: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header + ["label"])
        for row, y in zip(x, labels):
            w.writerow([v if isinstance(v, str) else ("NA" if np.isnan(v) else f"{v:.6g}") for v in row] + [y])
    return path


def wine_with_gaps(tmp: Path) -> tuple[Path, np.ndarray]:
    """scikit-learn's wine (columns from 0.1 to 1680) with 5 % of its values missing, as a CSV."""
    from sklearn.datasets import load_wine

    d = load_wine()
    x = d.data.copy()
    x[np.random.default_rng(0).random(x.shape) < 0.05] = np.nan
    return write_csv(tmp / "wine.csv", x, [f"cultivar_{y}" for y in d.target], list(d.feature_names)), x


def build(tmp: Path, dataset: Path, library: str = "lib", *flags: str) -> subprocess.CompletedProcess:
    """A short build: 6 epochs a trial, the search alone unless ``flags`` say otherwise."""
    return subprocess.run([sys.executable, "-m", "enserve", "build", "--dataset", str(dataset), "--time-budget",
                           "60s", "--workers", "1", "--max-epochs", "6", "--max-trials", "6", "--finish-fraction", "0",
                           "--library", str(tmp / library), "--model-repository", str(tmp / "repo"), *flags],
                          capture_output=True, text=True, timeout=300, cwd=tmp)


def test_a_csv_with_missing_values_is_served_from_its_raw_rows(tmp_path):
    """The build says what it chose; the served ensemble takes raw rows (NaN where a value is
    missing) and answers the mean of its members run directly on the same raw rows; its config says
    what the input expects and what the classes are."""
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    from tests.conftest import start_daemon

    dataset, x = wine_with_gaps(tmp_path)
    # the search ends at its 6th trial; finishing then trains 6 configurations x 5 folds, well within the budget
    out = build(tmp_path, dataset, "lib", "--finish-fraction", "0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout.splitlines()[0]
    assert first.startswith("data set 'wine': ") and "network family mlp" in first and "missingness" in first
    # 142 rows: the selection compared the finished configurations on out-of-fold predictions, and
    # serves each chosen one as its 5 fold models
    assert "selection on out-of-fold predictions for all 142 training and validation rows" in out.stdout
    assert "trial 0, the search's logistic-regression start, among them" in out.stdout
    served_members = sorted(p.parent.parent.name for p in (tmp_path / "repo").glob("trial_*/1/model.onnx"))
    assert served_members and len(served_members) % 5 == 0, served_members
    for m in served_members:
        config, fold = m.rsplit("_fold_", 1)
        assert (tmp_path / "lib" / "finished" / config / f"fold_{fold}.onnx").is_file()
    # the held-out line: the test rows' out-of-fold predictions of the ensemble and of its best member
    said = re.search(r"held out: ensemble test error (\S+), log loss (\S+); its best member \(trial (\d+)\) (\S+), "
                     r"(\S+);", out.stdout)
    assert said, out.stdout[-2000:]
    labels = np.load(tmp_path / "lib" / "finished" / "labels.npz")
    y, n = labels["y"], int(labels["trainval"])
    held = {int(c.split("_")[1]): np.load(tmp_path / "lib" / "finished" / c / "oof_pred.npy")[n:]
            for c in {m.rsplit("_fold_", 1)[0] for m in served_members}}

    def log_loss(p):
        return float(-np.mean(np.log(np.clip(p[np.arange(len(p)), y[n:]], 1e-12, 1))))

    best = min(held, key=lambda k: log_loss(held[k]))
    assert int(said[3]) == best and float(said[5]) == pytest.approx(log_loss(held[best]), abs=2e-4)
    assert float(said[4]) == pytest.approx(np.mean(held[best].argmax(1) != y[n:]), abs=1e-4)
    assert float(said[2]) == pytest.approx(log_loss(np.mean(list(held.values()), axis=0)), abs=2e-4)
    # the search began from the starting points: logistic regression, then the tabular MLP default
    import optuna

    from enserve.tuning.study import default_storage, make_storage

    trials = optuna.load_study(study_name="enserve", storage=make_storage(default_storage(tmp_path / "lib"))).trials
    assert [(t.params["depth"], t.params["weight_decay"]) for t in trials[:2]] == [(0, 1e-3), (2, 1e-5)]
    assert trials[1].params["width"] == 256 and trials[1].params["dropout"] == 0.1
    # each keeps its name in its record, by which a small data set's finishing always takes the
    # logistic regression (here the 6 trials are all finished; with one place, it still comes second)
    from enserve.tuning.finish import plan
    from enserve.tuning.library import read_records
    from enserve.tuning.space import LOGISTIC_START

    records = read_records(tmp_path / "lib")
    assert [r.config.get("start") for r in sorted(records, key=lambda r: r.number)[:3]] == \
        [LOGISTIC_START, "mlp_default", None]
    best = min((r for r in records if r.number < 100_000 and r.state != "failed"), key=lambda r: (r.val_loss, r.number))
    assert [t.number for t in plan(records, "kfold", top=1, folds=1, always=(LOGISTIC_START,))] == \
        [best.number] + ([0] if best.number != 0 else [])
    learned = json.loads((tmp_path / "lib" / "preprocessing.json").read_text())["mlp"]
    assert learned["kind"] == "per_column" and len(learned["median"]) == 13
    rows = x[:40].astype(np.float32)
    assert np.isnan(rows).any()
    members = [p for p in (tmp_path / "repo").glob("trial_*/1/model.onnx")]
    direct = np.mean([ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": rows})[0]
                      for p in members], axis=0)
    daemon = start_daemon(tmp_path / "repo", tmp_path)
    try:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        inp = grpcclient.InferInput("input", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        served = client.infer("ensemble", [inp]).as_numpy("probs")
        assert np.isfinite(served).all()
        np.testing.assert_allclose(served, direct, atol=1e-5)
        assert (served.argmax(1) == np.repeat([0], 40)).mean() > 0.8  # the first 40 wines are cultivar 0
        params = client.get_model_config("ensemble").config.parameters
        assert params["enserve.classes"].string_value == "cultivar_0,cultivar_1,cultivar_2"
        note = params["enserve.input"].string_value
        assert "13 columns in this order: alcohol, malic_acid" in note and "missing value is NaN" in note
    finally:
        assert daemon.stop() == 0


def test_a_text_column_is_refused_with_its_name(tmp_path):
    x = np.array([[1.0, "north"], [2.0, "south"], [np.nan, "north"], [4.0, "east"]] * 5, dtype=object)
    dataset = write_csv(tmp_path / "towns.csv", x, ["a", "b"] * 10, ["size", "region"])
    out = build(tmp_path, dataset)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "columns 'region' (e.g. 'north') are text, but the served model takes numbers only" in out.stderr
    assert not (tmp_path / "repo").exists()
    # a CSV of the label alone: refused before any training
    (tmp_path / "only.csv").write_text("label\n" + "a\nb\n" * 10)
    out = build(tmp_path, tmp_path / "only.csv")
    assert out.returncode == 2 and "no feature columns, only the label 'label'" in out.stderr, out.stderr[-2000:]


def test_a_continued_build_keeps_its_preprocessing(tmp_path):
    """The preprocessing is learned once, by the first build, and recorded; a continued build trains
    its new trials with the recorded one (the members' buffers say so)."""
    dataset, _ = wine_with_gaps(tmp_path)
    assert build(tmp_path, dataset, "lib", "--max-trials", "2").returncode == 0
    path = tmp_path / "lib" / "preprocessing.json"
    recorded = path.read_bytes()
    first = {p.parent.name for p in (tmp_path / "lib").glob("trial_*/weights.npz")}
    out = build(tmp_path, dataset, "lib", "--max-trials", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert path.read_bytes() == recorded
    later = [p for p in (tmp_path / "lib").glob("trial_*/weights.npz") if p.parent.name not in first]
    assert later
    mean = np.array(json.loads(recorded)["mlp"]["mean"], np.float32)
    for p in later:
        np.testing.assert_array_equal(np.load(p)["preprocess.mean"].ravel(), mean)
