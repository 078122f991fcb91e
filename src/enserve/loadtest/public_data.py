"""Public time-series data sets that ship offline inside the ``aeon`` package (the UCR archive's
GunPoint, ItalyPowerDemand, ArrowHead, OSULeaf, ...), written as an ``.npz`` that ``enserve build``
reads: ``x_train``/``y_train`` and the published ``x_test``/``y_test`` split, as (N, C, L) float32
signals and labels 0..k-1. Also prints the simple published baseline on that split, computed here:
1-nearest-neighbour with Euclidean distance (the UCR archive's reference classifier).

Needs only numpy and aeon (``pip install aeon``; it may pin its own numpy, so a separate venv is
fine):

    python src/enserve/loadtest/public_data.py GunPoint gunpoint.npz
"""

from __future__ import annotations

import sys

import numpy as np


def load(name: str) -> dict[str, np.ndarray]:
    try:
        from aeon.datasets import load_classification
    except ImportError:
        raise SystemExit("this script reads the data sets that ship inside aeon: pip install aeon "
                         "(in a separate venv if you like: it pins its own numpy)") from None

    x_train, y_train = load_classification(name, split="train")
    x_test, y_test = load_classification(name, split="test")
    labels = sorted(set(y_train) | set(y_test))
    code = {v: i for i, v in enumerate(labels)}
    return {"x_train": np.asarray(x_train, np.float32), "y_train": np.array([code[v] for v in y_train]),
            "x_test": np.asarray(x_test, np.float32), "y_test": np.array([code[v] for v in y_test])}


def one_nn_error(d: dict[str, np.ndarray]) -> float:
    """Test error of 1-NN with Euclidean distance over the flattened series."""
    train = d["x_train"].reshape(len(d["x_train"]), -1).astype(np.float64)
    test = d["x_test"].reshape(len(d["x_test"]), -1).astype(np.float64)
    dist = (test**2).sum(1)[:, None] - 2 * test @ train.T + (train**2).sum(1)[None, :]
    return float(np.mean(d["y_train"][dist.argmin(1)] != d["y_test"]))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    name, out = argv
    d = load(name)
    np.savez(out, **d)
    print(f"{name}: train {d['x_train'].shape}, test {d['x_test'].shape}, {len(set(d['y_train']))} classes -> {out}; "
          f"1-NN Euclidean test error {one_nn_error(d):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
