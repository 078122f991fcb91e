"""The accuracy script's repeated holdout (``enserve.loadtest.accuracy``): its seeds and its table as
known answers (the builds themselves are a benchmark, not a test)."""

from __future__ import annotations

import argparse

import pytest

from enserve.loadtest.accuracy import parse_seeds, split_table


def test_held_out_seeds_are_a_seed_a_range_or_a_list():
    assert parse_seeds("3") == [3] and parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("0,2,5") == [0, 2, 5]
    for bad in ("", "a", "-1", "3-1", "1,-2", "0-"):
        with pytest.raises(argparse.ArgumentTypeError, match="--held-out-seed"):
            parse_seeds(bad)


def test_the_split_table_has_every_split_and_their_mean():
    lines = split_table("penguins", {0: {"ensemble": (0.9766, 0.1), "LR": (0.9884, 0.03)},
                                     1: {"ensemble": (1.0, 0.02), "LR": (1.0, 0.05)}})
    assert lines == ["| penguins split | ensemble | LR |", "|---|---|---|",
                     "| 0 | 0.977 / 0.100 | 0.988 / 0.030 |",
                     "| 1 | 1.000 / 0.020 | 1.000 / 0.050 |",
                     "| mean | 0.9883 / 0.0600 | 0.9942 / 0.0400 |"]
