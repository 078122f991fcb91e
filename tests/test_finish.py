"""Finishing the best configurations: which tasks (known answers), the folds, and a small data set
built with out-of-fold predictions whose selection compares members on every row."""

from __future__ import annotations

import numpy as np
import pytest

from enserve.tuning.finish import (
    FINISHED_OFFSET,
    HOLDOUT,
    Task,
    finished_number,
    fold_of,
    plan,
    validation_scheme,
)
from enserve.tuning.library import TrialRecord


def record(number: int, state: str, val_loss: float, params: dict, start: str | None = None) -> TrialRecord:
    config = {"trial_params": params} | ({"start": start} if start else {})
    return TrialRecord(number, state, config, 3, [], val_loss, 0.1, 0.1, 0.01, 10, 10, "", "", "")


RECORDS = [record(0, "pruned", 0.50, {"w": 1}, "linear"), record(1, "complete", 0.20, {"w": 2}, "default"),
           record(2, "pruned", 0.10, {"w": 3}), record(3, "failed", 0.01, {"w": 4}),
           record(4, "pruned", 0.15, {"w": 3}),  # the same configuration as trial 2: finished once
           record(FINISHED_OFFSET + 9, "complete", 0.05, {"w": 9})]  # already finished: not again


def test_kfold_trains_every_fold_of_the_best_configurations():
    assert plan(RECORDS, "kfold", top=2, folds=3) == [Task(2, 0), Task(2, 1), Task(2, 2),
                                                      Task(1, 0), Task(1, 1), Task(1, 2)]


def test_kfold_always_finishes_the_baseline_second_after_the_best():
    # the start "linear" (trial 0) ranks last; named in ``always`` it comes second, after the best
    # (with top=1 too); a start already among the top is not finished twice, and holdout ignores ``always``
    assert plan(RECORDS, "kfold", top=2, folds=2, always=("linear",)) == [
        Task(2, 0), Task(2, 1), Task(0, 0), Task(0, 1), Task(1, 0), Task(1, 1)]
    assert plan(RECORDS, "kfold", top=1, folds=1, always=("linear",)) == [Task(2, 0), Task(0, 0)]
    assert plan(RECORDS, "kfold", top=2, folds=2, always=("default",)) == plan(RECORDS, "kfold", top=2, folds=2)
    # among the top, it moves up to second: a tight budget finishes it before the others
    assert plan(RECORDS, "kfold", top=3, folds=1, always=("linear",)) == [Task(2, 0), Task(0, 0), Task(1, 0)]
    assert plan(RECORDS, "kfold", top=3, folds=1) == [Task(2, 0), Task(1, 0), Task(0, 0)]
    best = [record(2, "pruned", 0.10, {"w": 3}, "linear"), record(1, "complete", 0.20, {"w": 2})]
    assert plan(best, "kfold", top=2, folds=1, always=("linear",)) == [Task(2, 0), Task(1, 0)]  # once
    assert plan(RECORDS, "kfold", top=2, folds=2, always=("absent",)) == plan(RECORDS, "kfold", top=2, folds=2)
    assert plan(RECORDS, "holdout", top=2, always=("linear",)) == plan(RECORDS, "holdout", top=2)


def test_holdout_trains_to_the_end_the_best_configurations_the_search_stopped_early():
    assert plan(RECORDS, "holdout", top=3, replicas=0) == [Task(2, HOLDOUT), Task(0, HOLDOUT)]  # trial 1 is complete


def test_holdout_trains_other_seeds_of_the_best_configurations():
    # best 2 (pruned): its run and 2 more seeds; 1 (complete): one more seed; 0 (pruned): its run;
    # a configuration's n-th seed comes after the next configuration's first
    assert plan(RECORDS, "holdout", top=3, replicas=2) == [
        Task(2, HOLDOUT), Task(1, HOLDOUT, 1), Task(2, HOLDOUT, 1), Task(0, HOLDOUT), Task(2, HOLDOUT, 2)]
    assert finished_number(Task(2, HOLDOUT, 1)) == 2 * FINISHED_OFFSET + 2


def test_the_scheme_follows_the_rows_unless_told():
    assert validation_scheme("auto", 142) == "kfold" and validation_scheme("auto", 1437) == "holdout"
    assert validation_scheme("holdout", 10) == "holdout"
    with pytest.raises(ValueError, match="validation 'loo' is not one of"):
        validation_scheme("loo", 10)


def test_folds_are_stratified_and_cover_every_row_once():
    y = np.repeat([0, 1, 2], [10, 20, 30])
    where = fold_of(y, 5, seed=0)
    assert sorted(np.unique(where)) == [0, 1, 2, 3, 4]
    for f in range(5):
        assert np.bincount(y[where == f], minlength=3).tolist() == [2, 4, 6]
    assert (fold_of(y, 5, seed=0) == where).all()


def test_a_library_keeps_its_fold_count(tmp_path):
    from enserve.tuning.finish import claim_folds

    claim_folds(tmp_path, 5, 30)
    claim_folds(tmp_path, 3, 30)  # no fold model yet (the first try's finishing failed): nothing to mix
    (tmp_path / "finished" / "trial_00004").mkdir()
    np.save(tmp_path / "finished" / "trial_00004" / "fold_0_pred.npy", np.zeros((4, 2)))
    claim_folds(tmp_path, 3, 30)  # a continued build with the same folds and epochs
    for folds, epochs in [(5, 30), (3, 90)]:
        with pytest.raises(ValueError, match=f"holds fold models of 3 folds trained 30 epochs; {folds} folds of "
                                             f"{epochs} epochs would mix with them"):
            claim_folds(tmp_path, folds, epochs)


def test_every_finishing_task_trains_with_its_own_seed():
    from enserve.tuning.finish import seed_of

    tasks = [Task(n, f, r) for n in range(0, 3000, 7) for f in (HOLDOUT, *range(10)) for r in range(3)]
    seeds = {seed_of(0, t) for t in tasks}
    assert len(seeds) == len(tasks) and all(0 <= s < 2**31 for s in seeds)
    assert seed_of(1, tasks[0]) != seed_of(0, tasks[0])


def test_folds_a_data_set_cannot_fill_are_refused_before_the_search(tmp_path):
    """12 rows of 3 classes of 4: 5 stratified folds cannot be made; the build says so at once
    (the finishing workers died with scikit-learn's error after the search, leaving no ensemble)."""
    from enserve.tuning.finish import check_folds
    from tests.conftest import build

    check_folds(np.repeat([0, 1, 2], [4, 4, 5]), 5)  # one class fills every fold
    (tmp_path / "tiny.csv").write_text("a,b,label\n" + "".join(f"{k},{k % 5},{'xyz'[k % 3]}\n" for k in range(12)))
    with pytest.raises(ValueError, match=r"--folds 5 needs a class of at least 5 rows; this data set's largest has "
                                         r"4 \(of 12 rows\): use --folds 4 or fewer, or --validation holdout"):
        build(str(tmp_path / "tiny.csv"), tmp_path / "lib", workers=1, time_budget_s=10, max_epochs=1)
    assert not (tmp_path / "lib" / "study.journal").exists()  # refused before any trial
