"""The model library: one directory per trial, every trial kept (stopped early or not), no pickles.

``<library>/trial_<n>/``: ``record.json`` (config, state, epochs, learning curve, losses, errors,
cost, parameter and FLOP counts), ``model.onnx`` (weights at its last rung, softmax included),
``weights.npz`` (the PyTorch state as plain arrays), ``val_pred.npy`` / ``test_pred.npy``
(probabilities; the selection never re-runs models). ``index.json`` (versioned) lists them; each
trial writes only its own directory, so any number of workers can share a library.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enserve.optimizer.files import write_atomically

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
    data_sha256: str = ""  # the training data's hash (``data.fingerprint``); empty in older libraries


DATASET_FILE = "dataset.json"


def library_dataset(library: Path) -> dict | None:
    """The fingerprint of the data set ``library`` belongs to, or None if it records none."""
    path = Path(library) / DATASET_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def claim_library(library: Path, fp: dict, y_val: np.ndarray, y_test: np.ndarray) -> None:
    """Record that ``library`` holds models of the data set ``fp``, or refuse another one. A
    library from before fingerprints is adopted only if its labels are this data set's."""
    from enserve.tuning.data import describe, same_data

    library = Path(library)
    have = library_dataset(library)
    way_out = (f"A library holds the models of one data set: build into another one (--library DIR, with a "
               f"new --storage if you share one), or remove {library} to start over.")
    if have is not None:
        if not same_data(have, fp):
            raise ValueError(f"the library {library} belongs to data set {describe(have)}; this build is on "
                             f"{describe(fp)}. {way_out}")
        return
    labels = library / "labels.npz"
    if labels.is_file():
        old = np.load(labels, allow_pickle=False)
        if old["y_val"].shape != y_val.shape or old["y_test"].shape != y_test.shape or \
                (old["y_val"] != y_val).any() or (old["y_test"] != y_test).any():
            raise ValueError(f"the library {library} was built on other data (its labels differ) than "
                             f"{describe(fp)}. {way_out}")
    library.mkdir(parents=True, exist_ok=True)
    write_atomically(library / DATASET_FILE, json.dumps(fp, indent=1).encode())


def trial_dir(library: Path, number: int) -> Path:
    return Path(library) / f"trial_{number:05d}"


def write_record(library: Path, record: TrialRecord) -> None:
    d = trial_dir(library, record.number)
    d.mkdir(parents=True, exist_ok=True)
    write_atomically(d / "record.json", json.dumps(record.__dict__, indent=1).encode())


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
    write_atomically(path, json.dumps(index, indent=1).encode())
    return path


@dataclass
class Candidates:
    """What the selection needs of the usable trials: predictions, labels, costs."""

    numbers: list[int]
    val_preds: np.ndarray  # (models, samples, classes)
    test_preds: np.ndarray
    costs: np.ndarray
    val_losses: np.ndarray
    labels: np.ndarray  # validation labels (for k-fold candidates: of every training and validation row)
    test_labels: np.ndarray
    models: list[list[Path]] | None = None  # each candidate's ONNX files (default: ``trial_dir``/model.onnx)

    def model_files(self, library: Path, k: int) -> list[Path]:
        """What candidate ``k`` is served as: its ONNX files (k-fold: one per fold), averaged."""
        return self.models[k] if self.models is not None else [trial_dir(library, self.numbers[k]) / "model.onnx"]


def save_arrays(path: Path, array: np.ndarray | None = None, **arrays: np.ndarray) -> None:
    """``np.save`` (one array) or ``np.savez`` (named ones) through a temporary file: a reader (a
    rerun, ``enserve select`` on another machine) never sees half of one."""
    buffer = io.BytesIO()
    if array is not None:
        np.save(buffer, array, allow_pickle=False)
    else:
        np.savez(buffer, **arrays)
    write_atomically(Path(path), buffer.getvalue())


def write_labels(library: Path, y_val: np.ndarray, y_test: np.ndarray) -> None:
    save_arrays(Path(library) / "labels.npz", y_val=y_val, y_test=y_test)


def candidates(library: Path) -> Candidates:
    records = [r for r in read_records(library) if r.state in ("complete", "pruned")]
    if not records:
        raise ValueError(f"{library}: no trained trial to select from")
    fp = library_dataset(library)
    strangers = [r.number for r in records if fp is not None and r.data_sha256 not in ("", fp["train_sha256"])]
    if strangers:
        raise ValueError(f"{library}: trials {strangers} were trained on other data than the library's data set "
                         f"'{fp['name']}'; remove their trial_* directories, or select from their own library")
    val = [np.load(trial_dir(library, r.number) / "val_pred.npy", allow_pickle=False) for r in records]
    test = [np.load(trial_dir(library, r.number) / "test_pred.npy", allow_pickle=False) for r in records]
    labels = np.load(Path(library) / "labels.npz", allow_pickle=False)
    odd = {r.number: v.shape[0] for r, v in zip(records, val) if v.shape[0] != len(labels["y_val"])}
    if odd:
        raise ValueError(f"{library}: trials {sorted(odd)} predict {sorted(set(odd.values()))} validation samples, but "
                         f"the library's data set has {len(labels['y_val'])}: they belong to another data set; remove "
                         "their trial_* directories")
    return Candidates([r.number for r in records], np.stack(val), np.stack(test),
                      np.array([r.cost_s for r in records]), np.array([r.val_loss for r in records]),
                      labels["y_val"], labels["y_test"])
