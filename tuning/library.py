"""The model library: one directory per trial, every trial kept (stopped early or not), no pickles.

``<library>/trial_<n>/``: ``record.json`` (config, state, epochs, learning curve, losses, errors,
cost, parameter and FLOP counts), ``model.onnx`` (weights at its last rung, softmax included),
``weights.npz`` (the PyTorch state as plain arrays), ``val_pred.npy`` / ``test_pred.npy``
(probabilities; the selection never re-runs models). ``index.json`` (versioned) lists them; each
trial writes only its own directory, so any number of workers can share a library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LIBRARY_VERSION = 1


@dataclass
class TrialRecord:
    number: int
    state: str  # "complete" | "pruned" | "failed"
    config: dict
    epochs: int
    curve: list[dict]
    val_loss: float
    val_error: float
    test_error: float
    cost_s: float  # seconds to predict COST_SAMPLES samples on one core
    parameters: int
    flops: int
    directory: str
    message: str = ""


def trial_dir(library: Path, number: int) -> Path:
    return Path(library) / f"trial_{number:05d}"


def write_record(library: Path, record: TrialRecord) -> None:
    d = trial_dir(library, record.number)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "record.json.tmp"
    tmp.write_text(json.dumps(record.__dict__, indent=1))
    os.replace(tmp, d / "record.json")


def read_records(library: Path) -> list[TrialRecord]:
    records = []
    for f in sorted(Path(library).glob("trial_*/record.json")):
        records.append(TrialRecord(**json.loads(f.read_text())))
    return records


def write_index(library: Path, dataset: str) -> Path:
    records = read_records(library)
    index = {"version": LIBRARY_VERSION, "dataset": dataset,
             "trials": [{k: getattr(r, k) for k in ("number", "state", "epochs", "val_loss", "val_error",
                                                      "test_error", "cost_s", "parameters", "flops", "directory")}
                        for r in records]}
    path = Path(library) / "index.json"
    path.write_text(json.dumps(index, indent=1))
    return path


def read_index(library: Path) -> dict:
    path = Path(library) / "index.json"
    if not path.is_file():
        raise ValueError(f"{library} has no index.json: not a model library (enserve build writes one)")
    index = json.loads(path.read_text())
    if index.get("version") != LIBRARY_VERSION:
        raise ValueError(f"{path}: version {index.get('version')!r}, but this enserve reads {LIBRARY_VERSION}")
    return index


@dataclass
class Candidates:
    """What the selection needs of the usable trials: predictions, labels, costs."""

    numbers: list[int]
    val_preds: np.ndarray  # (models, samples, classes)
    test_preds: np.ndarray
    costs: np.ndarray
    val_losses: np.ndarray
    labels: np.ndarray  # validation labels
    test_labels: np.ndarray


def write_labels(library: Path, y_val: np.ndarray, y_test: np.ndarray) -> None:
    np.savez(Path(library) / "labels.npz", y_val=y_val, y_test=y_test)


def candidates(library: Path) -> Candidates:
    records = [r for r in read_records(library) if r.state in ("complete", "pruned")]
    if not records:
        raise ValueError(f"{library}: no trained trial to select from")
    val = [np.load(trial_dir(library, r.number) / "val_pred.npy", allow_pickle=False) for r in records]
    test = [np.load(trial_dir(library, r.number) / "test_pred.npy", allow_pickle=False) for r in records]
    labels = np.load(Path(library) / "labels.npz", allow_pickle=False)
    return Candidates([r.number for r in records], np.stack(val), np.stack(test),
                      np.array([r.cost_s for r in records]), np.array([r.val_loss for r in records]),
                      labels["y_val"], labels["y_test"])
