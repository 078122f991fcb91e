"""Accuracy as users get it, measured: public data sets that ship inside installable packages, as
users have them (raw values), each split once into the rows the build may see and held-out rows it
never sees; ``enserve build`` on a file of the former (a CSV for tabular rows, an ``.npz`` else);
the served ensemble and each member asked over gRPC with the held-out rows; scikit-learn's first
tries on the same split beside them; the build's choices (validation scheme, members) quoted.

    python -m enserve.loadtest.accuracy --time-budget 3m [--datasets wine,penguins,...] [--out DIR]
        [--held-out-seed 0-9]

Data sets: ``wine`` (scikit-learn: 178 rows, 13 columns from 0.1 to 1680), ``penguins``
(palmerpenguins: 344 rows, 4 measurements from 13 mm to 6300 g, the year, island and sex as 0/1
columns, sex missing in 11 rows and every measurement in 2), ``digits`` (scikit-learn's 8x8 images
in their raw 0-16, as (N, 1, 8, 8)), ``mnist1d`` (the ``mnist1d`` package's generated 4000 training
and 1000 test rows of 40 values, as (N, 40) with no input kind; published MLP 0.68, CNN 0.94) and
``gunpoint`` (the UCR archive's GunPoint inside ``aeon``: 50 training and 150 test series of 150
values; the published 1-NN error 0.087; without aeon here, write it with ``loadtest/public_data.py``
where aeon is and pass ``gunpoint=PATH``). ``NAME=PATH`` measures any ``.npz`` with ``x_train``,
``y_train``, ``x_test`` and ``y_test``. Held out: 25 % of the rows (stratified, seed 0), or the
published test split where there is one. On a few hundred rows one held-out row is worth more than
1 % of accuracy: ``--held-out-seed 0-9`` (repeated holdout) builds a data set held out here (the
tabular ones, digits) once per split and prints each split's figures and their mean. Baselines, fitted on the build's rows (flattened) with
scikit-learn's defaults: ``StandardScaler`` + ``LogisticRegression`` (after ``SimpleImputer``,
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

HELD_OUT = 0.25  # of the rows, stratified (seed 0 unless --held-out-seed): never given to the build


Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_build, y_build, x_held, y_held (labels 0..k-1)


def held_out(x: np.ndarray, labels: np.ndarray, seed: int = 0) -> Split:
    """25 % of the rows held out, stratified (``seed`` 0 unless told); the labels as 0..k-1 in sorted
    order."""
    from sklearn.model_selection import train_test_split

    classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels])
    x_build, x_held, y_build, y_held = train_test_split(x, y, test_size=HELD_OUT, random_state=seed, stratify=y)
    return x_build, y_build, x_held, y_held


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


def digits(seed: int = 0) -> Split:
    from sklearn.datasets import load_digits

    d = load_digits()
    return held_out(d.images[:, None].astype(np.float32), d.target, seed)  # raw 0-16


def mnist1d() -> Split:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise SystemExit("mnist1d: pip install mnist1d (it generates the data set offline)") from None
    d = make_dataset(get_dataset_args())
    return (d["x"].astype(np.float32), np.asarray(d["y"]), d["x_test"].astype(np.float32), np.asarray(d["y_test"]))


def gunpoint() -> Split:
    from enserve.loadtest.public_data import load

    d = load("GunPoint")  # needs aeon
    return d["x_train"], d["y_train"], d["x_test"], d["y_test"]


def npz(path: str) -> Split:
    d = np.load(path)
    return d["x_train"], d["y_train"], d["x_test"], d["y_test"]


TABULAR = {"wine": wine, "penguins": penguins}  # given to the build as a CSV
ARRAYS = {"digits": digits, "mnist1d": mnist1d, "gunpoint": gunpoint}  # as an .npz of x_train, y_train
DATASETS = [*TABULAR, *ARRAYS]
SPLIT_HERE = {*TABULAR, "digits"}  # held out by this script (``--held-out-seed``); the others have a published split


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
    flat = x.reshape(len(x), -1)
    return {name: m.fit(flat, y).predict_proba(x_held.reshape(len(x_held), -1)) for name, m in models.items()}


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


def parse_seeds(text: str) -> list[int]:
    """``3``, ``0-9`` or ``0,2,5`` as held-out seeds."""
    try:
        if "-" in text.strip("-"):
            lo, hi = (int(v) for v in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(v) for v in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--held-out-seed '{text}' is not a seed, a range such as 0-9 or a list "
                                         "such as 0,2,5 (of seeds >= 0)")
    return seeds


def measure(name: str, budget: str, workers: int, out: Path, reuse: bool = False, seed: int = 0,
            held_out_seed: int = 0, split_dir: bool = False) -> tuple[list[tuple], dict[str, tuple[float, float]]]:
    """The build of ``name`` (in ``out/name``, or ``out/name/split_K`` with ``split_dir``) scored on
    its held-out rows: the printed rows, and a summary (accuracy, log loss) of the ensemble, its
    members' mean, its best member after the fact (by accuracy, then log loss) and the baselines."""
    name, _, path = name.partition("=")
    d = out / name / f"split_{held_out_seed}" if split_dir else out / name
    d.mkdir(parents=True, exist_ok=True)
    if path or name in ARRAYS:
        x_build, y_build, x_held, y_held = npz(path) if path else \
            digits(held_out_seed) if name == "digits" else ARRAYS[name]()
        dataset = d / f"{name}.npz"
        np.savez(dataset, x_train=x_build, y_train=y_build)
    elif name in TABULAR:
        x, labels, columns = TABULAR[name]()
        x_build, y_build, x_held, y_held = held_out(x, labels, held_out_seed)
        dataset = write_csv(d / f"{name}.csv", x_build, np.array(sorted(set(labels)))[y_build], columns)
    else:
        raise SystemExit(f"data set '{name}' is not one of {DATASETS}")
    t0 = time.monotonic()
    if reuse and (d / "build.log").is_file() and (d / "repo").is_dir():
        build = subprocess.CompletedProcess([], 0, (d / "build.log").read_text(), "")
    else:
        build = subprocess.run([sys.executable, "-m", "enserve", "build", "--dataset", str(dataset), "--time-budget",
                                budget, "--workers", str(workers), "--seed", str(seed), "--library", str(d / "library"),
                                "--model-repository", str(d / "repo")], capture_output=True, text=True)
        (d / "build.log").write_text(build.stdout + build.stderr)
    if build.returncode != 0:
        raise SystemExit(f"{name}: the build failed, see {d / 'build.log'}:\n{build.stderr[-2000:]}")
    print(f"{name}: built in {time.monotonic() - t0:.0f} s; {build.stdout.splitlines()[0]}", flush=True)
    for line in build.stdout.splitlines():
        if line.startswith(("finishing", "selection on", "held out", "the selection kept", "ensemble '")):
            print(f"  {line}")
    answers = served(d / "repo", x_held, d / "daemon.log")
    rows = [(f"{name}: {m}", *score(p, y_held)) for m, p in baselines(x_build, y_build, x_held).items()]
    members = sorted(k for k in answers if k != "ensemble")
    rows.append((f"{name}: enserve ensemble ({len(members)} members)", *score(answers["ensemble"], y_held)))
    rows += [(f"{name}:   member {m}", *score(answers[m], y_held)) for m in members]
    best = min(members, key=lambda m: score(answers[m], y_held)[1])
    rows.append((f"{name}:   its best member by held-out log loss ({best})", *score(answers[best], y_held)))
    chosen, answer = best_by_validation(d / "library", members, answers)
    rows.append((f"{name}:   its best member by validation ({chosen})", *score(answer, y_held)))
    member_scores = [score(answers[m], y_held) for m in members]
    summary = {"ensemble": score(answers["ensemble"], y_held),
               "best member by validation": score(answer, y_held),
               "members, mean": tuple(float(np.mean(v)) for v in zip(*member_scores)),
               "most accurate member*": max(member_scores, key=lambda s: (s[0], -s[1]))}
    summary |= {m: score(p, y_held) for m, p in baselines(x_build, y_build, x_held).items()}
    return rows, summary


def best_by_validation(library: Path, members: list[str], answers: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """The member the build ranks best without the held-out rows, and its answer: the configuration
    (``trial_N``, its fold models' mean answer for k-fold, as the selection compares them) with the
    lowest out-of-fold log loss on the training and validation rows, else (holdout) the trial with
    the lowest validation loss in its record."""
    import json

    groups: dict[str, list[str]] = {}
    for m in members:
        groups.setdefault(m.split("_fold_")[0], []).append(m)
    finished = library / "finished"
    if (finished / "labels.npz").is_file():
        saved = np.load(finished / "labels.npz")
        y = saved["y"][: int(saved["trainval"])]  # the rows the selection compares on
    losses = {}
    for trial in groups:
        oof = finished / trial / "oof_pred.npy"
        if oof.is_file():
            losses[trial] = log_loss(np.load(oof)[: len(y)], y)
        else:
            losses[trial] = json.loads((library / trial / "record.json").read_text())["val_loss"]
    best = min(groups, key=lambda t: (losses[t], t))
    return best, np.mean([answers[m] for m in groups[best]], axis=0)


def split_table(name: str, summaries: dict[int, dict[str, tuple[float, float]]]) -> list[str]:
    """Repeated holdout: each split's accuracy / log loss and the mean over the splits."""
    columns = list(next(iter(summaries.values())))
    lines = [f"| {name} split | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for k, s in summaries.items():
        lines.append(f"| {k} | " + " | ".join(f"{s[c][0]:.3f} / {s[c][1]:.3f}" for c in columns) + " |")
    mean = {c: [float(np.mean([s[c][i] for s in summaries.values()])) for i in (0, 1)] for c in columns}
    lines.append("| mean | " + " | ".join(f"{mean[c][0]:.4f} / {mean[c][1]:.4f}" for c in columns) + " |")
    return lines


def score(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return float(np.mean(p.argmax(1) == y)), log_loss(p, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enserve.loadtest.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="wine,penguins", help=f"comma-separated, of {', '.join(DATASETS)}, or "
                        "NAME=PATH.npz (x_train, y_train, x_test, y_test)")
    parser.add_argument("--time-budget", default="3m", help="each build's (enserve build --time-budget)")
    parser.add_argument("--workers", type=int, default=2, help="each build's trial workers")
    parser.add_argument("--out", type=Path, default=None, help="keep the builds here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="the build's seed (its split and samplers); the held-out "
                        "rows stay the same")
    parser.add_argument("--held-out-seed", type=parse_seeds, default=[0], help="which 25 %% of the rows of "
                        f"{', '.join(sorted(SPLIT_HERE))} are held out: a seed, or a range (0-9) or list (0,2,5) for "
                        "repeated holdout, one build per seed and the mean over them (the others' published test "
                        "splits are fixed: the first seed only)")
    parser.add_argument("--reuse", action="store_true", help="serve the builds already in --out instead of building")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="enserve-accuracy-") as tmp:
        out = args.out or Path(tmp)
        rows, tables = [], []
        repeated = len(args.held_out_seed) > 1
        for name in args.datasets.split(","):
            seeds = args.held_out_seed if name in SPLIT_HERE else args.held_out_seed[:1]
            summaries = {}
            for k in seeds:  # a split of its own folder: --reuse never serves a build of other rows
                got, summaries[k] = measure(name, args.time_budget, args.workers, out, args.reuse, args.seed, k,
                                            split_dir=name in SPLIT_HERE and (repeated or k != 0))
                rows += got
            if len(seeds) > 1:
                tables.append(split_table(name, summaries))
        print(f"\n{'model (held-out rows, raw features over gRPC for enserve)':<62} {'accuracy':>8} {'log loss':>8}")
        for label, acc, loss in rows:
            print(f"{label:<62} {acc:>8.4f} {loss:>8.4f}")
        for lines in tables:
            print("\nrepeated holdout, accuracy / log loss (* best on the held-out rows, after the fact)")
            print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
