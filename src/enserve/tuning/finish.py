"""Finishing: the last part of a build's time trains the best configurations to the end, so that
the library holds several good, fully trained members for the selection (successive halving stops
most trials at its first rungs, and the selection could only find one member worth keeping).

- Holdout validation (larger data sets): each of the best configurations the search stopped early
  is trained again on the training split for the whole epoch budget, and the best ones also with
  other seeds (``REPLICAS`` more for the best, one fewer for each next: deep ensembles' diversity,
  which averaging needs and which configurations alone did not give: the selection kept one member
  on digits and MNIST-1D); each joins the library as a trial of its own (``finished_number``).
- K-fold validation (small data sets: fewer than ``SMALL_ROWS`` training and validation rows; a
  validation split of a few dozen rows makes the selection's losses noise): each of the best
  configurations is trained on K folds of every row the build was given (training, validation and
  test splits: a small data set cannot spare a fifth), which gives an out-of-fold prediction for
  every row. The selection compares configurations on the out-of-fold predictions of the training
  and validation rows; those of the test rows (each from the one fold model that did not train on
  it, and never seen by the selection) are what the build reports as held out. A chosen
  configuration is served as its K fold models (K members, each trained on (K-1)/K of the rows:
  bagging's diversity; on the held-out splits of wine and penguins they did better than one model
  refit on every row, see the README).

Planning is pure (``plan``); ``main`` is a worker process (``python -P -m enserve.tuning.finish``)
that does its share of the tasks until the deadline.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from enserve.tuning.library import save_arrays

SMALL_ROWS = 1000  # training + validation rows below which the selection uses k-fold predictions
FOLDS = 5
TOP_CONFIGS = 8  # configurations finished, best validation loss first
FINISHED_OFFSET = 100_000  # a finished holdout trial's number: (1 + replica) x this + its configuration's number
REPLICAS = 2  # holdout: more seeds of the best configuration, one fewer for each next
HOLDOUT = -1  # a holdout task's fold: the configuration trained to the end on the training split
VALIDATIONS = ("auto", "holdout", "kfold")
FINISHED_DIR = "finished"  # <library>/finished/trial_<n>/: k-fold members


@dataclass(frozen=True)
class Task:
    number: int  # the trial whose configuration is trained
    fold: int  # 0..K-1 (k-fold), or HOLDOUT (holdout)
    replica: int = 0  # holdout: 0 the search's seed, 1.. other seeds


def finished_number(task: Task) -> int:
    """The library trial number of a finished holdout task."""
    return FINISHED_OFFSET * (1 + task.replica) + task.number


def validation_scheme(requested: str, rows: int) -> str:
    """'kfold' or 'holdout' for a data set of ``rows`` training and validation rows."""
    if requested not in VALIDATIONS:
        raise ValueError(f"validation '{requested}' is not one of {VALIDATIONS}")
    if requested != "auto":
        return requested
    return "kfold" if rows < SMALL_ROWS else "holdout"


def plan(records: list, scheme: str, *, top: int = TOP_CONFIGS, folds: int = FOLDS,
         replicas: int = REPLICAS, always: tuple[str, ...] = ()) -> list[Task]:
    """The tasks, most valuable first: the ``top`` distinct configurations by validation loss
    (records of trained trials; finished ones excluded), for k-fold each one's folds; for holdout
    the ones the search stopped before the end, and ``replicas`` other seeds of the best (one fewer
    for each next), a configuration's n-th seed after the next configuration's first.

    For k-fold, a starting point named in ``always`` (a record's ``config["start"]``: the search's
    logistic regression) is finished whatever its rank, second after the best (or first, as the
    best): on a few dozen validation rows the search's ranking prefers networks that fit those rows,
    and the selection can only weigh the simple model if it is among the finished."""
    trained = [r for r in records if r.state in ("complete", "pruned") and r.number < FINISHED_OFFSET]
    seen, best = set(), []
    for r in sorted(trained, key=lambda r: (r.val_loss, r.number)):
        key = json.dumps(r.config.get("trial_params", {}), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        best.append(r)
    if scheme == "kfold":
        starts = [r for r in best[1:] if r.config.get("start") in always]
        ranked = best[:1] + starts + [r for r in best[1:top] if r not in starts]
        return [Task(r.number, f) for r in ranked for f in range(folds)]
    best = best[:top]
    ordered = []  # (rank + the task's place among its configuration's, that place, the task)
    for rank, r in enumerate(best):
        seeds = range(0 if r.state == "pruned" else 1, max(0, replicas - rank) + 1)
        ordered += [(rank + place, place, Task(r.number, HOLDOUT, k)) for place, k in enumerate(seeds)]
    return [task for *_, task in sorted(ordered, key=lambda o: o[:2])]


def fold_of(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's fold, 0..folds-1 (stratified, shuffled with ``seed``; a class with fewer rows than
    folds is simply missing from some of them)."""
    import warnings

    from sklearn.model_selection import StratifiedKFold

    out = np.zeros(len(labels), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only n members"
        for f, (_, rows) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels)):
            out[rows] = f
    return out


def finished_dir(library: Path, number: int) -> Path:
    return Path(library) / FINISHED_DIR / f"trial_{number:05d}"


def check_folds(labels: np.ndarray, folds: int) -> None:
    """K folds need at least K rows of some class (stratified folds of rarer classes are only
    missing from some folds)."""
    largest = int(np.bincount(labels).max()) if len(labels) else 0
    if largest < folds:
        raise ValueError(f"--folds {folds} needs a class of at least {folds} rows; this data set's largest has "
                         f"{largest} (of {len(labels)} rows): use --folds {max(2, largest)} or fewer, or "
                         "--validation holdout")


def claim_folds(library: Path, folds: int, epochs: int) -> None:
    """A library keeps its folds and their epochs once it holds a fold model: models of another
    split, or trained longer, would mix with its own in one configuration's predictions (the split
    seed is the data set's, which the library keeps already)."""
    from enserve.optimizer.files import write_atomically

    path = Path(library) / FINISHED_DIR / "folds.json"
    if path.is_file() and any((Path(library) / FINISHED_DIR).glob("trial_*/fold_*_pred.npy")):
        kept = json.loads(path.read_text())
        if kept != {"folds": folds, "epochs": epochs}:
            raise ValueError(f"the library {library} holds fold models of {kept['folds']} folds trained "
                             f"{kept['epochs']} epochs; {folds} folds of {epochs} epochs would mix with them: use "
                             f"--folds {kept['folds']} (and the schedule the study keeps, without --max-epochs), "
                             "or another library")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps({"folds": folds, "epochs": epochs}).encode())


def seed_of(seed: int, task: Task) -> int:
    """A task's training seed: distinct for every (configuration, fold, replica) of a build."""
    return int(np.random.SeedSequence([seed, task.number, task.fold + 1, task.replica]).generate_state(1)[0] >> 1)


def run_task(task: Task, data, library: Path, scheme: str, folds: int, epochs: int, seed: int,
             preprocessing: dict | None, profiler) -> None:
    """Train one task's model and write what it predicts, and the model."""
    import torch

    from enserve.tuning.library import read_records
    from enserve.tuning.preprocess import member
    from enserve.tuning.space import config_from_record
    from enserve.tuning.train import build_model

    record = next(r for r in read_records(library) if r.number == task.number)
    config = config_from_record(record)
    torch.manual_seed(seed_of(seed, task))
    family = record.config.get("family")
    net = build_model(config.network)
    model = member(family, preprocessing[family], net, data.input_shape) if preprocessing and family else net
    if scheme == "holdout":
        train_holdout(task, record, config, model, data, library, epochs, seed, profiler)
    else:
        train_fold(task, config, model, data, library, folds, epochs, seed, profiler)


def train_holdout(task: Task, record, config, model, data, library: Path, epochs: int, seed: int,
                  profiler) -> None:
    """The configuration trained to the end on the training split (with the task's seed); it joins
    the library as trial ``finished_number(task)``."""
    from enserve.tuning.cost import measure_cost
    from enserve.tuning.export import export_onnx
    from enserve.tuning.library import TrialRecord, trial_dir, write_record
    from enserve.tuning.selection import cross_entropy, error_rate
    from enserve.tuning.train import predict, train

    result = train(model, data, config, epochs=epochs, seed=seed_of(seed, task))
    number = finished_number(task)
    d = trial_dir(library, number)
    d.mkdir(parents=True, exist_ok=True)
    val_pred, test_pred = predict(model, data.x_val), predict(model, data.x_test)
    save_arrays(d / "val_pred.npy", val_pred)
    save_arrays(d / "test_pred.npy", test_pred)
    path = export_onnx(model, data.input_shape, d / "model.onnx", check=data.x_test[:32])
    write_record(library, TrialRecord(
        number, "complete", record.config, result.epochs, result.curve, cross_entropy(val_pred, data.y_val),
        error_rate(val_pred, data.y_val), error_rate(test_pred, data.y_test), measure_cost(path, data, profiler),
        record.parameters, record.flops, d.name, f"trial {task.number} trained to the end"
        + (f" with seed {task.replica}" if task.replica else ""), record.data_sha256))


def train_fold(task: Task, config, model, data, library: Path, folds: int, epochs: int, seed: int,
               profiler) -> None:
    """The configuration trained on every row but fold ``task.fold``'s; its predictions for that
    fold are written last (they mark the task done)."""
    from enserve.optimizer.files import write_atomically
    from enserve.tuning.cost import measure_cost
    from enserve.tuning.data import Dataset
    from enserve.tuning.export import export_onnx
    from enserve.tuning.train import predict, train

    x = np.concatenate([data.x_train, data.x_val, data.x_test])
    y = np.concatenate([data.y_train, data.y_val, data.y_test])
    where = fold_of(y, folds, seed)
    d = finished_dir(library, task.number)
    d.mkdir(parents=True, exist_ok=True)
    keep, held = where != task.fold, where == task.fold
    # no validation rows to stop on: the model trains the search's optimizer steps (its epochs over
    # the training split, fewer over the fold's larger share; the held fold is what its curve reports)
    part = Dataset(data.name, data.kind, data.classes, x[keep], y[keep], x[held], y[held], x[held], y[held],
                   data.columns, data.class_names, data.families)
    train(model, part, config, epochs=max(1, round(epochs * len(data.x_train) / int(keep.sum()))),
          seed=seed_of(seed, task))
    path = export_onnx(model, data.input_shape, d / f"fold_{task.fold}.onnx", check=x[held][:32])
    if task.fold == 0:  # every fold model has the configuration's architecture: measured once
        write_atomically(d / "cost.json", json.dumps({"number": task.number,
                                                      "cost_s": measure_cost(path, data, profiler)}).encode())
    save_arrays(d / f"fold_{task.fold}_pred.npy", predict(model, x[held]))  # last: it marks done


def assemble(library: Path, y: np.ndarray, trainval: int, folds: int, seed: int) -> list[int]:
    """Write each k-fold configuration's out-of-fold predictions for every row (``oof_pred.npy``;
    ``y`` the labels of the training, validation and test rows, the first ``trainval`` of them what
    the selection compares on) where all its folds are done; the trial numbers."""
    where = fold_of(y, folds, seed)
    done = []
    for d in sorted((Path(library) / FINISHED_DIR).glob("trial_*")):
        parts = [d / f"fold_{f}_pred.npy" for f in range(folds)]
        if not all(p.is_file() for p in parts) or not (d / "cost.json").is_file():
            continue
        first = np.load(parts[0])
        oof = np.zeros((len(y), first.shape[1]), first.dtype)
        for f, p in enumerate(parts):
            oof[where == f] = np.load(p)
        save_arrays(d / "oof_pred.npy", oof)
        done.append(int(d.name.split("_")[1]))
    save_arrays(Path(library) / FINISHED_DIR / "labels.npz", y=y, trainval=trainval)
    return done


def kfold_candidates(library: Path):
    """The k-fold configurations as the selection's candidates (out-of-fold predictions: of the
    training and validation rows to select on, of the test rows to report; the cost of K fold
    models), or None if the library has none."""
    from enserve.tuning.library import Candidates
    from enserve.tuning.selection import cross_entropy

    root = Path(library) / FINISHED_DIR
    dirs = [d for d in sorted(root.glob("trial_*")) if (d / "oof_pred.npy").is_file()] if root.is_dir() else []
    if not dirs or not (root / "labels.npz").is_file():
        return None
    saved = np.load(root / "labels.npz")
    y, n = saved["y"], int(saved["trainval"])
    oof = np.stack([np.load(d / "oof_pred.npy") for d in dirs])
    costs = [json.loads((d / "cost.json").read_text()) for d in dirs]
    folds = [sorted(d.glob("fold_*.onnx"), key=lambda p: int(p.stem.split("_")[1])) for d in dirs]
    return Candidates([c["number"] for c in costs], oof[:, :n], oof[:, n:],
                      np.array([c["cost_s"] * len(f) for c, f in zip(costs, folds)]),
                      np.array([cross_entropy(p, y[:n]) for p in oof[:, :n]]), y[:n], y[n:], models=folds)


@dataclass(frozen=True)
class FinishSettings:
    """What every finishing worker shares (JSON on its command line)."""

    dataset: str
    library: str
    input_kind: str
    seed: int
    scheme: str
    folds: int
    epochs: int
    deadline: float
    threads: int
    tasks: list  # [number, fold, replica], this worker's share, most valuable first


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    import torch

    from enserve.optimizer.profiles import Profiler
    from enserve.tuning.data import load_dataset
    from enserve.tuning.preprocess import read as read_preprocessing

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else argv
    s = FinishSettings(**json.loads(argv[0]))
    torch.set_num_threads(s.threads)
    data = load_dataset(s.dataset, seed=s.seed, input_kind=s.input_kind)
    preprocessing = read_preprocessing(s.library)
    with Profiler() as profiler:
        for number, fold, replica in s.tasks:
            if time.time() >= s.deadline:
                break
            run_task(Task(number, fold, replica), data, Path(s.library), s.scheme, s.folds, s.epochs, s.seed, preprocessing,
                     profiler)
    return 0


def settings_for(tasks: list[Task], workers: int, **common) -> list[dict]:
    """Each worker's settings: the tasks dealt round-robin (so every worker starts on the best)."""
    shares = [[[t.number, t.fold, t.replica] for t in tasks[i::workers]] for i in range(workers)]
    return [asdict(FinishSettings(tasks=share, **common)) for share in shares if share]


if __name__ == "__main__":
    sys.exit(main())
