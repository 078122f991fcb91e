"""Building a library with asynchronous successive halving: two worker processes sharing a journal."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("optuna", reason="the 'tune' extra is not installed")

from tuning.library import candidates, read_index, read_records, write_index  # noqa: E402
from tuning.search import build_library  # noqa: E402


def test_two_workers_build_a_library_and_a_rerun_continues(tmp_path):
    import optuna

    lib = tmp_path / "lib"
    storage = build_library("digits", lib, workers=2, time_budget_s=25, max_epochs=3, pruner="asha",
                            sampler="random", seed=0, max_trials=6)
    records = read_records(lib)
    study = optuna.load_study(study_name="enserve", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))
    assert len(records) == len(study.trials) >= 2
    assert {r.state for r in records} <= {"complete", "pruned", "failed"}
    done = [r for r in records if r.state != "failed"]
    for r in done:
        assert 1 <= r.epochs <= 3 and len(r.curve) == r.epochs and r.cost_s > 0 and r.parameters > 0
        assert (lib / r.directory / "model.onnx").is_file()
    index = read_index(lib) if (lib / "index.json").is_file() else json.loads(write_index(lib, "digits").read_text())
    assert index["version"] == 1 and len(index["trials"]) == len(records)
    c = candidates(lib)
    assert c.val_preds.shape[1:] == (360, 10) and np.allclose(c.val_preds.sum(axis=2), 1, atol=1e-4)
    before = len(study.trials)
    build_library("digits", lib, workers=1, time_budget_s=8, max_epochs=3, seed=1, max_trials=before + 1)
    assert len(optuna.load_study(study_name="enserve", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage))).trials) > before  # the same study, continued
