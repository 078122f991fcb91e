"""Data sets for the build pipeline, split once with a fixed seed (train / validation / test).

Sources: ``digits`` (scikit-learn's 8x8 digits, read from the installed package: no download),
an ``.npz`` with ``x_train``/``y_train`` and optionally ``x_val``/``y_val``, ``x_test``/``y_test``
(absent splits are carved from the training arrays), a folder with one sub-folder of images per
class, CIFAR-10/100 in their published python-pickle format (the ``.tar.gz`` or its extracted
folder), and CSV for tabular data (label in the ``label`` column, else the last one).
Images are float32 (N, C, H, W) in [0, 1]; signals (N, C, L), or (N, L) read with input kind
'signal', become (N, C, L); other rows are tabular, float32 (N, F).
"""

from __future__ import annotations

import csv
import hashlib
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Dataset:
    name: str
    kind: str  # "image" | "signal" | "tabular"
    classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    columns: tuple[str, ...] = ()  # a CSV's feature columns, in input order
    class_names: tuple[str, ...] = ()  # what each class index stands for (a CSV's label values), if known
    families: tuple[str, ...] = ()  # the network families searched (``families.families_for``)
    why: str = ""  # why those

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


SPLITS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def fingerprint(data: Dataset, seed: int) -> dict:
    """What a library records of its data set: name, kind, classes, every split's shape and dtype,
    a hash of the training arrays (after the split) and the split seed."""
    digest = hashlib.sha256()
    for a in (data.x_train, data.y_train):
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return {"name": data.name, "kind": data.kind, "classes": data.classes,
            "shapes": {k: list(getattr(data, k).shape) for k in SPLITS},
            "dtypes": {k: getattr(data, k).dtype.str for k in SPLITS},
            "train_sha256": digest.hexdigest(), "split_seed": seed,
            "columns": list(data.columns), "class_names": list(data.class_names)}


def same_data(a: dict, b: dict) -> bool:
    """Whether two fingerprints are of the same data, split the same way (the name may differ)."""
    keys = ("classes", "shapes", "dtypes", "train_sha256", "split_seed")
    return all(a.get(k) == b.get(k) for k in keys)


def describe(fp: dict) -> str:
    shape = fp["shapes"]["x_train"]
    return (f"'{fp['name']}': {shape[0]} training samples of shape {tuple(shape[1:])}, {fp['classes']} classes, "
            f"split seed {fp['split_seed']}, training hash {fp['train_sha256'][:12]}")


def carve(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Stratified split of ``fraction`` of (x, y) off the rest: (x_rest, y_rest, x_part, y_part)."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    try:
        x_rest, x_part, y_rest, y_part = train_test_split(x, y, test_size=fraction, random_state=seed,
                                                          stratify=stratify)
    except ValueError as exc:
        raise ValueError(f"{len(y)} rows ({np.count_nonzero(counts)} classes) are too few to set {fraction:.0%} "
                         f"of them aside with every class in it ({exc}); give more rows, or your own x_val/x_test "
                         "in an .npz") from None
    return x_rest, y_rest, x_part, y_part


def labels_of(name: str, y) -> np.ndarray:
    """Labels as int64 class numbers, or a ValueError saying what they are instead."""
    raw = np.asarray(y)
    if raw.ndim != 1:
        raise ValueError(f"{name}: labels must be one class number a row, not shape {raw.shape}")
    whole = raw.dtype.kind in "iub" or (raw.dtype.kind == "f" and bool(np.all(np.isfinite(raw)))
                                        and bool(np.all(raw == np.round(raw))))
    if not whole or (len(raw) and raw.min() < 0):
        raise ValueError(f"{name}: labels must be class numbers 0..k-1, not {raw.dtype} values like "
                         f"{raw[:3].tolist()} (a CSV may have text labels)")
    return raw.astype(np.int64)


def check_splits(name: str, kind: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Every split as many rows as labels, rows of x_train's shape, and values a network can take:
    finite, or NaN for a missing value in tabular rows (imputed inside every member)."""
    shape = np.shape(splits["x_train"][0])[1:]
    for key, (xs, ys) in splits.items():
        xs = np.asarray(xs)
        if len(xs) != len(ys):
            raise ValueError(f"{name}: {key} has {len(xs)} rows but {len(ys)} labels")
        if xs.shape[1:] != shape:
            raise ValueError(f"{name}: {key} rows are of shape {xs.shape[1:]}, but x_train's are {shape}")
        if xs.dtype.kind not in "iufb":
            raise ValueError(f"{name}: {key} holds {xs.dtype} values, not numbers")
        bad = np.isinf(xs) if kind == "tabular" else ~np.isfinite(xs)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            what = "infinite" if kind == "tabular" else "NaN or infinite"
            raise ValueError(f"{name}: {key} has {int(bad.sum())} {what} values (the first at {at}: {xs[at]}); "
                             + ("a missing value is NaN" if kind == "tabular" else
                                f"{kind}s must be complete (only tabular rows may miss values)"))


def make_dataset(name: str, kind: str, x: np.ndarray, y: np.ndarray, *, seed: int = 0,
                 val_fraction: float = 0.2, test_fraction: float = 0.2,
                 x_val=None, y_val=None, x_test=None, y_test=None) -> Dataset:
    y = labels_of(name, y)
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} inputs but {len(y)} labels")
    if x_test is None:
        x, y, x_test, y_test = carve(x, y, test_fraction, seed)
    if x_val is None:
        x, y, x_val, y_val = carve(x, y, val_fraction / (1 - test_fraction), seed + 1)
    y_val, y_test = labels_of(name, y_val), labels_of(name, y_test)
    check_splits(name, kind, {"x_train": (x, y), "x_val": (x_val, y_val), "x_test": (x_test, y_test)})
    classes = int(max(y.max(), np.max(y_val), np.max(y_test))) + 1
    unseen = sorted(set(range(classes)) - set(y.tolist()) - set(y_val.tolist()) - set(y_test.tolist()))
    if unseen:
        raise ValueError(f"{name}: labels are class numbers 0..k-1, but classes {unseen[:5]} of 0..{classes - 1} have "
                         "no row: number the classes from 0 without gaps")
    f = np.float32
    return Dataset(name, kind, classes, x.astype(f), y, np.asarray(x_val, f), np.asarray(y_val, np.int64),
                   np.asarray(x_test, f), np.asarray(y_test, np.int64))


def load_digits(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return make_dataset("digits", "image", (d.images / 16.0)[:, None, :, :], d.target, seed=seed)


INPUT_KINDS = ("auto", "image", "signal", "tabular")


def input_kind_of(x: np.ndarray, requested: str, where: str) -> tuple[str, np.ndarray]:
    """(kind, x): 4-D arrays are images, 3-D signals, 2-D tabular rows unless 'signal' is asked for
    (then one channel)."""
    if requested not in INPUT_KINDS:
        raise ValueError(f"input kind '{requested}' is not one of {INPUT_KINDS}")
    found = {4: "image", 3: "signal", 2: "tabular"}.get(x.ndim)
    if found is None:
        raise ValueError(f"{where}: inputs of shape {x.shape} are not (N, C, H, W), (N, C, L) or (N, F)")
    if requested in ("auto", found):
        return found, x
    if requested == "signal" and found == "tabular":
        return "signal", x[:, None, :]
    raise ValueError(f"{where}: inputs of shape {x.shape} cannot be read as '{requested}' (they look {found})")


def load_npz(path: Path, seed: int = 0, input_kind: str = "auto") -> Dataset:
    data = np.load(path)
    for key in ("x_train", "y_train"):
        if key not in data:
            raise ValueError(f"{path}: needs arrays 'x_train' and 'y_train' (has {sorted(data.files)})")
    kind, x = input_kind_of(data["x_train"], input_kind, str(path))
    extra = {k: data[k] for k in ("x_val", "y_val", "x_test", "y_test") if k in data}
    for k in ("x_val", "x_test"):
        if k in extra:
            extra[k] = input_kind_of(extra[k], kind, f"{path} {k}")[1]
    return make_dataset(path.stem, kind, x, data["y_train"], seed=seed, **extra)


def load_image_folder(path: Path, size: int = 32, seed: int = 0) -> Dataset:
    from PIL import Image

    classes = sorted(p for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{path}: expected one sub-folder of images per class")
    xs, ys = [], []
    for label, folder in enumerate(classes):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as img:
                    arr = np.asarray(img.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
                xs.append(arr.transpose(2, 0, 1))
                ys.append(label)
    if not xs:
        raise ValueError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    return make_dataset(path.name, "image", np.stack(xs), np.array(ys), seed=seed)


def _cifar_members(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with tarfile.open(path) as tar:
        return {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def load_cifar(path: Path, seed: int = 0) -> Dataset:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) python pickles."""
    files = _cifar_members(path)

    def unpickle(name: str) -> dict:
        return pickle.load(io.BytesIO(files[name]), encoding="bytes")

    if "data_batch_1" in files:
        train = [unpickle(n) for n in sorted(files) if n.startswith("data_batch_")]
        test, key, name = unpickle("test_batch"), b"labels", "cifar10"
    elif "train" in files:
        train, test, key, name = [unpickle("train")], unpickle("test"), b"fine_labels", "cifar100"
    else:
        raise ValueError(f"{path}: not a CIFAR-10/100 python archive (no data_batch_1 nor train)")

    def images(batch: dict) -> np.ndarray:
        return batch[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0

    x = np.concatenate([images(b) for b in train])
    y = np.concatenate([np.asarray(b[key]) for b in train])
    return make_dataset(name, "image", x, y, seed=seed, x_test=images(test), y_test=np.asarray(test[key]))


MISSING = ("", "na", "nan", "n/a", "null", "none", "?")  # how a CSV says a value is missing (any case)


def label_order(label: str) -> tuple:
    """A CSV's class order: numeric labels by value (2 before 10), then text ones alphabetically."""
    value = _number(label)
    return (0, value, label) if value is not None and not np.isnan(value) else (1, 0.0, label)


def _number(text: str) -> float | None:
    """The value of a CSV field: a float, NaN if it says 'missing', None if it is text."""
    t = text.strip()
    if t.lower() in MISSING:
        return float("nan")
    try:
        return float(t)
    except ValueError:
        return None


def load_csv(path: Path, label: str = "label", seed: int = 0) -> Dataset:
    """A header row, then one row per sample; the label in column ``label`` (else the last). Every
    other column must be numbers: a missing value may be empty, NA, NaN, null, none or '?', and is
    imputed inside the served model (``preprocess``). A text column is refused with its name: the
    served model takes one tensor of numbers, the CSV's columns in order, so a category must be
    encoded as numbers in the file (e.g. one 0/1 column per value) or left out."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if len(rows) < 2:
        raise ValueError(f"{path}: needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    short = [k + 2 for k, r in enumerate(body) if len(r) != len(header)]
    if short:
        raise ValueError(f"{path}: rows {short[:5]} have not {len(header)} fields, as the header has")
    header = [h.strip() for h in header]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise ValueError(f"{path}: columns {twice} appear more than once in the header: name each column once")
    named = [j for j, h in enumerate(header) if h.lower() == label.lower()]
    col = named[0] if named else len(header) - 1  # 'label' in any case, else the last column
    features = [j for j in range(len(header)) if j != col]
    if not features:
        raise ValueError(f"{path}: no feature columns, only the label '{header[col]}': a model needs at least one "
                         "column of numbers besides the label")
    parsed = [[_number(r[j]) for j in features] for r in body]
    text = {}
    for k, j in enumerate(features):
        bad = next((r[j] for r, p in zip(body, parsed) if p[k] is None), None)
        if bad is not None:
            text[header[j]] = bad
    if text:
        named = ", ".join(f"'{n}' (e.g. {v!r})" for n, v in list(text.items())[:5])
        raise ValueError(f"{path}: columns {named} are text, but the served model takes numbers only (one FP32 "
                         "tensor of the CSV's columns); encode them as numbers in the file, e.g. one 0/1 column "
                         "per category, or leave them out")
    infinite = [header[j] for k, j in enumerate(features) if any(p[k] in (np.inf, -np.inf) for p in parsed)]
    if infinite:
        raise ValueError(f"{path}: columns {infinite[:5]} hold infinite values; a network takes finite numbers "
                         "(leave a value empty if it is missing)")
    names = [r[col].strip() for r in body]
    unlabelled = [k + 2 for k, v in enumerate(names) if v.lower() in MISSING]
    if unlabelled:
        raise ValueError(f"{path}: rows {unlabelled[:5]} have no label in column '{header[col]}'")
    values = sorted(set(names), key=label_order)
    if not named and len(body) >= 20 and len(values) > len(body) / 2:
        raise ValueError(f"{path}: no column is called '{label}', and the last one, '{header[col]}', has "
                         f"{len(values)} different values in {len(body)} rows: it does not look like a label; "
                         f"call the label column '{label}'")
    index = {v: i for i, v in enumerate(values)}
    x = np.array(parsed, dtype=np.float32)
    y = np.array([index[v] for v in names])
    data = make_dataset(path.stem, "tabular", x, y, seed=seed)
    data.columns = tuple(header[j] for j in features)
    data.class_names = tuple(values)
    return data


def load_dataset(spec: str, seed: int = 0, image_size: int = 32, input_kind: str = "auto") -> Dataset:
    """``digits``, or a path: ``.npz``, ``.csv``, a CIFAR archive or folder, a folder of class
    folders; with the network families it searches (``families``) and why."""
    from enserve.tuning.families import families_for

    data = _load(spec, seed, image_size, input_kind)
    # a 2-D data set's every split: a missing value anywhere rules the signal family out (it does not impute)
    rows = np.concatenate([data.x_train, data.x_val, data.x_test]) if data.x_train.ndim == 2 else data.x_train
    data.families, data.why = families_for(data.kind, rows, input_kind)
    return data


def _load(spec: str, seed: int, image_size: int, input_kind: str) -> Dataset:
    if spec == "digits":
        return load_digits(seed)
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"data set '{spec}' is neither 'digits' nor an existing path")
    if path.suffix == ".npz":
        return load_npz(path, seed, input_kind)
    if path.suffix == ".csv":
        data = load_csv(path, seed=seed)
        if input_kind == "signal":  # each row one signal, one channel
            input_kind_of(data.x_train, input_kind, str(path))
            for split in ("x_train", "x_val", "x_test"):
                setattr(data, split, getattr(data, split)[:, None, :])
            data.kind = "signal"
        elif input_kind == "image":
            input_kind_of(data.x_train, input_kind, str(path))  # refused, naming the shape
        return data
    if path.name.endswith((".tar.gz", ".tgz")) or (path.is_dir() and any(
            (p.name in ("data_batch_1", "train")) for p in path.rglob("*"))):
        return load_cifar(path, seed)
    if path.is_dir():
        return load_image_folder(path, image_size, seed)
    raise ValueError(f"data set '{spec}': unknown format (expected digits, .npz, .csv, CIFAR, or a folder)")
