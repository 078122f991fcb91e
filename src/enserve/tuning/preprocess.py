"""Preprocessing learned once, from the training split, and carried inside every member.

One definition, ``Preprocess`` (a torch module), serves training (the member's first layer), the
library's predictions (made by the same member) and the exported graph (it is exported with the
member: a few ONNX nodes in front of the network). Clients send raw values, as in the user's file.

- Tabular rows (``PerColumn``): a missing value (NaN) becomes the column's training median; each
  column is then centred and scaled by its training mean and standard deviation (after imputation,
  as scikit-learn's ``SimpleImputer`` then ``StandardScaler``); every column that had missing values
  in the training split adds a 0/1 column saying the value was missing (the network can learn that
  missingness means something), appended after the scaled columns.
- Images and signals (``PerChannel``): each channel centred and scaled by its training mean and
  standard deviation, so data in 0-255 or in volts trains as data in 0-1 does.

A column or channel that does not vary in the training split is scaled by 1 (as scikit-learn does).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

KINDS = ("per_column", "per_channel")


@dataclass(frozen=True)
class Preprocessing:
    """What was learned from the training split (JSON in the library, buffers in every member)."""

    kind: str  # one of KINDS
    mean: tuple[float, ...]  # per column (after imputation) or per channel
    scale: tuple[float, ...]
    median: tuple[float, ...] = ()  # per column: what a missing value becomes
    indicate: tuple[int, ...] = ()  # columns that had missing values in training: each adds a 0/1 column

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"preprocessing kind '{self.kind}' is not one of {KINDS}")

    def features_out(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the network sees for raw inputs of ``input_shape`` (no batch axis)."""
        if self.kind == "per_column":
            return (input_shape[0] + len(self.indicate),)
        return tuple(input_shape)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        data = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _scale(std: np.ndarray) -> np.ndarray:
    return np.where(std > 0, std, 1.0)


def per_column(x_train: np.ndarray) -> Preprocessing:
    """Medians, means and scales of (N, F) training rows, NaN marking a missing value. A column
    missing in every training row is refused with its index (nothing can be learned of it)."""
    if x_train.ndim != 2:
        raise ValueError(f"per-column preprocessing needs (N, F) rows, not shape {x_train.shape}")
    x = np.asarray(x_train, dtype=np.float64)
    missing = np.isnan(x)
    empty = np.flatnonzero(missing.all(axis=0))
    if len(empty):
        raise ValueError(f"columns {empty.tolist()} have no value in any training row")
    median = np.nanmedian(x, axis=0)
    imputed = np.where(missing, median, x)
    return Preprocessing("per_column", tuple(imputed.mean(axis=0).tolist()), tuple(_scale(imputed.std(axis=0)).tolist()),
                         tuple(median.tolist()), tuple(np.flatnonzero(missing.any(axis=0)).tolist()))


def per_channel(x_train: np.ndarray) -> Preprocessing:
    """Means and scales per channel of (N, C, ...) images or signals."""
    if x_train.ndim < 3:
        raise ValueError(f"per-channel preprocessing needs (N, C, ...) inputs, not shape {x_train.shape}")
    if np.isnan(x_train).any():
        raise ValueError("images and signals must not have missing values (NaN): only tabular columns are imputed")
    axes = (0, *range(2, x_train.ndim))
    x = np.asarray(x_train, dtype=np.float64)
    return Preprocessing("per_channel", tuple(x.mean(axis=axes).tolist()), tuple(_scale(x.std(axis=axes)).tolist()))


def learn(x_train: np.ndarray, kind: str) -> Preprocessing:
    return per_column(x_train) if kind == "per_column" else per_channel(x_train)


CLIP = 1000.0  # standard deviations: a scaled tabular value is kept within +-CLIP


class Preprocess(nn.Module):
    """``Preprocessing`` as a layer: raw inputs in, what the network trains on out. Exported to ONNX
    as IsNaN / Where / Sub / Div / Clip (/ Concat of the missingness columns). A tabular value beyond
    ``CLIP`` training standard deviations (an infinite one, or one that overflows when scaled) counts
    as ``CLIP``: without the clip an infinite value made every output NaN."""

    def __init__(self, p: Preprocessing, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.kind = p.kind
        shape = (1, -1) if p.kind == "per_column" else (1, -1, *([1] * (len(input_shape) - 1)))
        self.register_buffer("mean", torch.tensor(p.mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("scale", torch.tensor(p.scale, dtype=torch.float32).reshape(shape))
        self.register_buffer("median", torch.tensor(p.median or p.mean, dtype=torch.float32).reshape(1, -1)
                             if p.kind == "per_column" else torch.zeros(0))
        self.register_buffer("indicate", torch.tensor(p.indicate, dtype=torch.long))
        self.impute = p.kind == "per_column"
        self.indicators = len(p.indicate) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.impute:
            return (x - self.mean) / self.scale
        missing = torch.isnan(x)
        out = ((torch.where(missing, self.median, x) - self.mean) / self.scale).clamp(-CLIP, CLIP)
        if self.indicators:
            out = torch.cat([out, missing[:, self.indicate].to(out.dtype)], dim=1)
        return out


class Member(nn.Module):
    """A served member: raw inputs (a channel axis added when a signal family reads rows), the
    preprocessing, then the network (which ends in logits)."""

    def __init__(self, preprocess: Preprocess, net: nn.Module, add_channel: bool = False) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.net = net
        self.add_channel = add_channel

    def prepared(self, x: torch.Tensor) -> torch.Tensor:
        """What the network trains on: the raw inputs, preprocessed."""
        return self.preprocess(x.unsqueeze(1) if self.add_channel else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepared(x))


def member(family: str, p: Preprocessing, net: nn.Module, input_shape: tuple[int, ...]) -> Member:
    """The member of ``family`` around ``net``, for raw inputs of ``input_shape`` (no batch axis)."""
    from enserve.tuning.families import network_view

    view = network_view(family, input_shape)
    return Member(Preprocess(p, view), net, add_channel=len(view) != len(input_shape))


PREPROCESSING_FILE = "preprocessing.json"


def learn_for(families: tuple[str, ...], x_train: np.ndarray,
              columns: tuple[str, ...] = ()) -> dict[str, Preprocessing]:
    """Each family's preprocessing, learned from the training split (seen as the family reads it);
    ``columns`` (a CSV's names) name a column that cannot be learned."""
    from enserve.tuning.families import PREPROCESSING, network_view

    if columns and x_train.ndim == 2:
        empty = np.flatnonzero(np.isnan(x_train).all(axis=0))
        if len(empty):
            raise ValueError(f"columns {', '.join(repr(columns[j]) for j in empty)} have no value in any training "
                             "row: nothing can be learned of them; fill them or leave them out of the file")
    out = {}
    for family in families:
        view = network_view(family, x_train.shape[1:])
        out[family] = learn(x_train.reshape(len(x_train), *view), PREPROCESSING[family])
    return out


def write(library, learned: dict[str, Preprocessing]) -> None:
    from pathlib import Path

    from enserve.optimizer.files import write_atomically

    text = json.dumps({f: json.loads(p.to_json()) for f, p in learned.items()}, indent=1)
    write_atomically(Path(library) / PREPROCESSING_FILE, text.encode())


def read(library) -> dict[str, Preprocessing] | None:
    """The library's preprocessing per family, or None if it records none."""
    from pathlib import Path

    path = Path(library) / PREPROCESSING_FILE
    if not path.is_file():
        return None
    return {f: Preprocessing.from_json(json.dumps(v)) for f, v in json.loads(path.read_text()).items()}
