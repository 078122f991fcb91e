"""One trial worker: a process (``python -P -m enserve.tuning.trial_worker '<json>'``, started by
``tuning.workers``) that pulls trials from the shared study until its deadline."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from enserve.tuning.objective import TrialFailed, TrialSettings, objective
from enserve.tuning.schedule import BATCH_HIGH, BATCH_LOW
from enserve.tuning.study import (
    PRUNERS,
    SAMPLERS,
    make_pruner,
    make_sampler,
    make_storage,
    sampler_seed,
)


def worker(storage: str, study_name: str, dataset: str, library: str, deadline: float, max_epochs: int,
           threads: int, seed: int, max_trials: int | None, input_kind: str = "auto", index: int = 0) -> None:
    """One worker process: pull trials from the shared study until the deadline, with the sampler
    seeded by ``sampler_seed``."""
    import logging
    import warnings

    import optuna
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # the exporter's notes, once per trial
    warnings.filterwarnings("ignore", category=FutureWarning)

    from enserve.tuning.data import fingerprint, load_dataset
    from enserve.tuning.preprocess import read as read_preprocessing

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_dataset(dataset, seed=seed, input_kind=input_kind)
    preprocessing = read_preprocessing(library)  # learned once by the build, from the training split
    attrs = optuna.load_study(study_name=study_name, storage=make_storage(storage)).user_attrs
    schedule = attrs.get("schedule", {})
    max_epochs = schedule.get("max_epochs", max_epochs)
    goal = attrs.get("objective", {})
    settings = TrialSettings(max_epochs, seed, (schedule.get("batch_low", BATCH_LOW), schedule.get("batch_high", BATCH_HIGH)),
                             fingerprint(data, seed)["train_sha256"], goal.get("cost_weight", 0.0),
                             goal.get("cost_ref", 1.0))
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage),
                              sampler=make_sampler(attrs.get("sampler", SAMPLERS[0]), sampler_seed(seed, index, storage)),
                              pruner=make_pruner(attrs.get("pruner", PRUNERS[0]), max_epochs, schedule.get("min_epochs", 1)))
    remaining = deadline - time.time()
    if remaining <= 0:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if complete:
            return
        remaining = 1e-3  # a build with no trained trial has nothing to select: one trial, however late
    callbacks = []
    if max_trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(max_trials, states=None))
    from enserve.optimizer.profiles import Profiler

    with Profiler() as profiler:
        study.optimize(lambda t: objective(t, data, Path(library), settings, profiler, preprocessing), timeout=remaining,
                       catch=(TrialFailed,), callbacks=callbacks, gc_after_trial=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    worker(**json.loads(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
