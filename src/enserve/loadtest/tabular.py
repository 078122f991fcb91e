"""Tabular data as users have it, measured: public data sets that ship inside installable packages,
each split once into the rows the build may see and held-out rows it never sees; ``enserve build``
on a CSV of the former; the served ensemble asked over gRPC with the held-out rows' raw features;
scikit-learn's first tries on the same split beside it.

    python -m enserve.loadtest.tabular --time-budget 3m [--datasets wine,penguins] [--out DIR]

Data sets: ``wine`` (scikit-learn: 178 rows, 13 columns from 0.1 to 1680) and ``penguins``
(palmerpenguins: 344 rows, 4 measurements from 13 mm to 6300 g, the year, island and sex as 0/1
columns, sex missing in 11 rows and every measurement in 2). Baselines, fitted on the build's rows
with scikit-learn's defaults: ``StandardScaler`` + ``LogisticRegression`` (after ``SimpleImputer``,
which missing values need) and ``HistGradientBoostingClassifier`` (takes them as they are).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from enserve.loadtest.launcher import start_daemon

HELD_OUT = 0.25  # of the rows, stratified, seed 0: never given to the build


def wine() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_wine

    d = load_wine()
    return d.data, np.array([f"cultivar_{t}" for t in d.target]), list(d.feature_names)


def penguins() -> tuple[np.ndarray, np.ndarray, list[str]]:
    import palmerpenguins

    df = palmerpenguins.load_penguins()
    numeric = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year"]
    x = df[numeric].to_numpy(dtype=np.float64)
    islands = sorted(df["island"].unique())
    one_hot = np.stack([(df["island"] == i).to_numpy(dtype=np.float64) for i in islands], axis=1)
    sex = np.where(df["sex"].isna(), np.nan, (df["sex"] == "male").to_numpy(dtype=np.float64))
    columns = numeric + [f"island_{i}" for i in islands] + ["sex_male"]
    return np.hstack([x, one_hot, sex[:, None]]), df["species"].to_numpy(dtype=str), columns


DATASETS = {"wine": wine, "penguins": penguins}


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, columns: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*columns, "label"])
        for row, label in zip(x, y):
            w.writerow([("" if np.isnan(v) else repr(float(v))) for v in row] + [label])
    return path


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))


def baselines(x: np.ndarray, y: np.ndarray, x_held: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    models = {"StandardScaler+LogisticRegression": make_pipeline(SimpleImputer(), StandardScaler(),
                                                                 LogisticRegression()),
              "HistGradientBoosting": HistGradientBoostingClassifier()}
    return {name: m.fit(x, y).predict_proba(x_held) for name, m in models.items()}


def served(repo: Path, x_held: np.ndarray, log: Path) -> dict[str, np.ndarray]:
    """Each served model's answer (the ensemble and every member) to the held-out raw rows, over gRPC."""
    import tritonclient.grpc as grpcclient

    daemon = start_daemon(repo, "--no-optimize", log=log)
    try:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        rows = x_held.astype(np.float32)
        out = {}
        for model in client.get_model_repository_index().models:
            limit = client.get_model_config(model.name).config.max_batch_size
            parts = []
            for lo in range(0, len(rows), limit):
                inp = grpcclient.InferInput("input", list(rows[lo : lo + limit].shape), "FP32")
                inp.set_data_from_numpy(rows[lo : lo + limit])
                parts.append(client.infer(model.name, [inp]).as_numpy("probs"))
            out[model.name] = np.concatenate(parts)
        return out
    finally:
        daemon.stop()


def measure(name: str, budget: str, workers: int, out: Path, reuse: bool = False) -> list[tuple]:
    from sklearn.model_selection import train_test_split

    x, labels, columns = DATASETS[name]()
    classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels])
    x_build, x_held, y_build, y_held = train_test_split(x, y, test_size=HELD_OUT, random_state=0, stratify=y)
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    dataset = write_csv(d / f"{name}.csv", x_build, np.array(classes)[y_build], columns)
    t0 = time.monotonic()
    if reuse and (d / "build.log").is_file() and (d / "repo").is_dir():
        build = subprocess.CompletedProcess([], 0, (d / "build.log").read_text(), "")
    else:
        build = subprocess.run([sys.executable, "-m", "enserve", "build", "--dataset", str(dataset), "--time-budget",
                                budget, "--workers", str(workers), "--library", str(d / "library"),
                                "--model-repository", str(d / "repo")], capture_output=True, text=True)
        (d / "build.log").write_text(build.stdout + build.stderr)
    if build.returncode != 0:
        raise SystemExit(f"{name}: the build failed, see {d / 'build.log'}:\n{build.stderr[-2000:]}")
    print(f"{name}: built in {time.monotonic() - t0:.0f} s; {build.stdout.splitlines()[0]}", flush=True)
    for line in build.stdout.splitlines():
        if line.startswith(("finishing", "selection on", "held out", "the selection kept", "the members refit")):
            print(f"  {line}")
    answers = served(d / "repo", x_held, d / "daemon.log")
    rows = [(f"{name}: {m}", *score(p, y_held)) for m, p in baselines(x_build, y_build, x_held).items()]
    members = sorted(k for k in answers if k != "ensemble")
    rows.append((f"{name}: enserve ensemble ({len(members)} members)", *score(answers["ensemble"], y_held)))
    rows += [(f"{name}:   member {m}", *score(answers[m], y_held)) for m in members]
    return rows


def score(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return float(np.mean(p.argmax(1) == y)), log_loss(p, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="wine,penguins")
    parser.add_argument("--time-budget", default="3m")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the builds here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="serve the builds already in --out instead of building")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="enserve-tabular-") as tmp:
        out = args.out or Path(tmp)
        rows = []
        for name in args.datasets.split(","):
            rows += measure(name, args.time_budget, args.workers, out, args.reuse)
        print(f"\n{'model (held-out rows, raw features over gRPC for enserve)':<62} {'accuracy':>8} {'log loss':>8}")
        for label, acc, loss in rows:
            print(f"{label:<62} {acc:>8.4f} {loss:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
