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


def test_the_best_member_by_validation_is_the_configuration_ranked_best_without_the_held_out_rows(tmp_path):
    import json

    import numpy as np

    from enserve.loadtest.accuracy import best_by_validation

    # k-fold: two configurations, each served as two fold models; trial 7's out-of-fold predictions
    # are right on the 3 training and validation rows (the 4th row, a test row, is not compared on)
    y = np.array([0, 1, 1, 0])
    finished = tmp_path / "finished"
    for trial, right in (("trial_00003", 0.6), ("trial_00007", 0.9)):
        (finished / trial).mkdir(parents=True)
        oof = np.where(np.eye(2)[y] == 1, right, 1 - right)
        oof[3] = [0.0, 1.0] if trial.endswith("7") else [1.0, 0.0]  # the test row: trial 7 wrong, must not count
        np.save(finished / trial / "oof_pred.npy", oof)
    np.savez(finished / "labels.npz", y=y, trainval=3)
    answers = {f"trial_0000{t}_fold_{k}": np.full((2, 2), 0.1 * (t + k)) for t in (3, 7) for k in (0, 1)}
    name, answer = best_by_validation(tmp_path, sorted(answers), answers)
    assert name == "trial_00007" and np.allclose(answer, 0.1 * 7.5)
    # holdout: the record's validation loss
    for trial, loss in (("trial_00001", 0.3), ("trial_00002", 0.2)):
        (tmp_path / trial).mkdir()
        (tmp_path / trial / "record.json").write_text(json.dumps({"val_loss": loss}))
    answers = {"trial_00001": np.zeros((1, 2)), "trial_00002": np.ones((1, 2))}
    assert best_by_validation(tmp_path, sorted(answers), answers)[0] == "trial_00002"
