"""Which network families a data set searches, and why: pure, no torch.

A family is a kind of network with its own search space and its own preprocessing: ``mlp`` for
tabular rows (per-column imputation and scaling), ``cnn1d`` for signals and ``cnn2d`` for images
(per-channel scaling). 4-D inputs are images and 3-D ones signals; 2-D rows are tabular, unless
they could as well be a signal (at least ``SIGNAL_MIN_LENGTH`` columns and no missing value): then
both ``mlp`` and ``cnn1d`` are searched, the family is a hyperparameter like any other (as AutoML
systems treat model families), and the validation loss decides. ``--input-kind`` says which."""

from __future__ import annotations

import numpy as np

FAMILIES = ("mlp", "cnn1d", "cnn2d")
KIND_FAMILY = {"tabular": "mlp", "signal": "cnn1d", "image": "cnn2d"}  # the family a data kind reads as alone
PREPROCESSING = {"mlp": "per_column", "cnn1d": "per_channel", "cnn2d": "per_channel"}
SIGNAL_MIN_LENGTH = 16  # a 1-D CNN's three stages halve the length twice: shorter rows leave it nothing


def families_for(kind: str, x_train: np.ndarray, requested: str) -> tuple[tuple[str, ...], str]:
    """(families to search, why) for inputs of ``kind`` read with input kind ``requested``;
    ``x_train`` the rows looked at (for 2-D data, every split's)."""
    if kind == "image":
        return (KIND_FAMILY[kind],), "4-D inputs (N, C, H, W) are images"
    if kind == "signal":
        return (KIND_FAMILY[kind],), ("--input-kind signal" if requested == "signal" else
                                      "3-D inputs (N, C, L) are signals")
    if requested == "tabular":
        return (KIND_FAMILY["tabular"],), "--input-kind tabular"
    columns = x_train.shape[1]
    if columns < SIGNAL_MIN_LENGTH:
        return ("mlp",), f"(N, {columns}) rows with fewer than {SIGNAL_MIN_LENGTH} columns are tabular"
    if np.isnan(x_train).any():
        return ("mlp",), f"(N, {columns}) rows with missing values are tabular"
    return ("mlp", "cnn1d"), (f"(N, {columns}) rows without missing values could be tabular rows or a signal: "
                              "both families are searched and the validation loss decides (--input-kind tabular "
                              "or signal says which)")


def network_view(family: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a family's network reads (no batch axis): a signal family given (F,) rows reads
    (1, F), one channel."""
    return (1, *input_shape) if family == "cnn1d" and len(input_shape) == 1 else tuple(input_shape)
