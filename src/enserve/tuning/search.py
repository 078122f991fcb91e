"""Building the library: an Optuna study whose pruner is asynchronous successive halving (or
Hyperband) over epochs, run by worker processes (``trial_worker``) that share the study's storage.
Every trial, pruned or not, goes into the library."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from enserve.tuning import finish
from enserve.tuning import workers as trial_workers
from enserve.tuning.cost import epoch_seconds, middle_cost
from enserve.tuning.options import BuildOptions
from enserve.tuning.schedule import Schedule
from enserve.tuning.study import default_storage, make_sampler, make_storage


def keep_preprocessing(library: Path, data) -> dict:
    """The library's preprocessing per family: what it recorded (a continued build keeps it), and
    for a family it has none of, learned now from the training split and recorded."""
    from enserve.tuning import preprocess

    kept = preprocess.read(library) or {}
    missing = tuple(f for f in data.families if f not in kept)
    if missing:
        kept |= preprocess.learn_for(missing, data.x_train, data.columns or ())
        preprocess.write(library, kept)
    return {f: kept[f] for f in data.families}


def build_library(options: BuildOptions, *, progress: Callable[[], None] | None = None,
                  progress_every_s: float = 10.0, on_schedule: Callable[[Schedule], None] | None = None,
                  say: Callable[[str], None] | None = None) -> str:
    """Create (or continue) the study and run ``options.workers`` processes on it until the time
    budget; returns the storage. The epoch budget, ASHA's rungs and the batch sizes follow the data
    and the time budget (``schedule``) unless ``max_epochs`` forces the budget; a continued study
    keeps its schedule. ``say`` hears first what the build chose for the data (families, preprocessing)
    and why, ``on_schedule(Schedule)`` what schedule. ``objective``
    'error-and-cost' adds the inference cost to what the search minimises (``TrialSettings``); a
    study keeps its objective."""
    import optuna

    from enserve.tuning.data import describe, fingerprint, load_dataset, same_data
    from enserve.tuning.library import claim_library, write_labels
    from enserve.tuning.schedule import choose_schedule

    options.validate()
    o = options
    dataset, study_name, sampler, pruner, workers = str(o.dataset), o.study_name, o.sampler, o.pruner, o.workers
    time_budget_s, max_epochs, seed, max_trials = o.time_budget_s, o.max_epochs, o.seed, o.max_trials
    input_kind, objective, cost_weight = o.input_kind, o.objective, o.cost_weight
    library = Path(o.library)
    library.mkdir(parents=True, exist_ok=True)
    data = load_dataset(dataset, seed=seed, input_kind=input_kind)
    if o.finish_fraction > 0 and finish.validation_scheme(o.validation, len(data.x_train) + len(data.x_val)) == "kfold":
        import numpy as np

        finish.check_folds(np.concatenate([data.y_train, data.y_val, data.y_test]), o.folds)  # before any search
    fp = fingerprint(data, seed)
    claim_library(library, fp, data.y_val, data.y_test)  # refuses another data set's library
    preprocessing = keep_preprocessing(library, data)
    if say is not None:
        say(f"data set '{data.name}': {len(data.x_train)} training rows of shape {data.input_shape}, {data.classes} "
            f"classes; network {'families' if len(data.families) > 1 else 'family'} {', '.join(data.families)}: "
            f"{data.why}; preprocessing learned from the training split ("
            + ", ".join(f"{f}: {p.kind.replace('_', ' ')}" + (f", {len(p.indicate)} missingness columns"
                                                             if p.indicate else "") for f, p in preprocessing.items())
            + ") and exported inside every member")
        say(f"building a library in {library} for {time_budget_s:g} s with {workers} workers ({sampler} sampler, "
            f"{pruner} pruner); interrupt and rerun to continue")
    storage = o.storage or default_storage(library)
    study = optuna.create_study(study_name=study_name, storage=make_storage(storage), direction="minimize",
                                sampler=make_sampler(sampler, seed), load_if_exists=True)
    ran_on = study.user_attrs.get("dataset")
    if ran_on is not None and not same_data(ran_on, fp):
        raise ValueError(f"the study '{study_name}' in {storage} was run on data set {describe(ran_on)}; this build "
                         f"is on {describe(fp)}: its trials cannot be compared. Use another study (--storage, or "
                         f"another library with its own journal).")
    study.set_user_attr("dataset", fp)
    write_labels(library, data.y_val, data.y_test)
    study.set_user_attr("sampler", sampler)
    study.set_user_attr("pruner", pruner)
    threads = max(1, (os.cpu_count() or 1) // workers)
    kept = study.user_attrs.get("schedule")
    if kept is not None and max_epochs is None:
        schedule = Schedule(**kept)  # a continued study keeps its rungs
    else:
        epoch_s = epoch_seconds(data, threads, preprocessing=preprocessing) if max_epochs is None else 0.0
        # sized for the search's share: the finishing trains the best configurations again afterwards
        schedule = choose_schedule(len(data.x_train), time_budget_s * (1 - o.finish_fraction), workers, epoch_s,
                                   max_epochs)
        study.set_user_attr("schedule", asdict(schedule))
    if on_schedule is not None:
        on_schedule(schedule)
    if not study.trials:  # a new study starts from the known-good defaults (a continued one has them)
        from enserve.tuning.space import starting_points

        for name, params in starting_points(data, (schedule.batch_low, schedule.batch_high)).items():
            study.enqueue_trial(params, user_attrs={"start": name}, skip_if_exists=True)
    goal = study.user_attrs.get("objective")
    if goal is None:
        goal = {"kind": objective, "cost_weight": 0.0, "cost_ref": 1.0}
        if objective == "error-and-cost":
            goal |= {"cost_weight": cost_weight, "cost_ref": middle_cost(data, preprocessing)}
        study.set_user_attr("objective", goal)
    elif goal["kind"] != objective:
        raise ValueError(f"the study '{study_name}' in {storage} minimises '{goal['kind']}', not '{objective}': "
                         "a study keeps its objective; use another library (or --storage) for the other one")
    max_epochs = schedule.max_epochs
    start = time.time()
    deadline = start + time_budget_s * (1 - o.finish_fraction)
    kwargs = [dict(storage=storage, study_name=study_name, dataset=dataset, library=str(library), deadline=deadline,
                   max_epochs=max_epochs, threads=threads, seed=seed, max_trials=max_trials, input_kind=input_kind,
                   index=i) for i in range(workers)]
    run_workers("enserve.tuning.trial_worker", kwargs, progress, progress_every_s)
    if o.finish_fraction > 0:
        finish_library(o, data, max_epochs, threads, start + time_budget_s, progress, progress_every_s, say)
    return storage


def run_workers(module: str, kwargs: list[dict], progress, progress_every_s: float) -> None:
    started = trial_workers.start(kwargs, module)
    try:
        trial_workers.watch(started, progress=progress, progress_every_s=progress_every_s)
    finally:
        trial_workers.stop(started)  # on an interrupt or a failure: none is left running


def finish_library(o: BuildOptions, data, epochs: int, threads: int, deadline: float, progress,
                   progress_every_s: float, say: Callable[[str], None] | None) -> None:
    """The finishing stage (``finish``): the best configurations trained to the end (on every fold,
    for k-fold validation, the logistic-regression start among them whatever its rank) by the workers
    until ``deadline``; k-fold predictions assembled."""
    from enserve.tuning.library import read_records, trial_dir
    from enserve.tuning.space import LOGISTIC_START

    library = Path(o.library)
    scheme = finish.validation_scheme(o.validation, len(data.x_train) + len(data.x_val))
    if scheme == "kfold":
        finish.claim_folds(library, o.folds, epochs)

    def done(t: finish.Task) -> bool:
        if scheme == "holdout":
            return (trial_dir(library, finish.finished_number(t)) / "record.json").is_file()
        d = finish.finished_dir(library, t.number)
        return (d / f"fold_{t.fold}_pred.npy").is_file()

    records = read_records(library)
    planned = finish.plan(records, scheme, folds=o.folds, always=(LOGISTIC_START,))
    tasks = [t for t in planned if not done(t)]
    rows = len(data.x_train) + len(data.x_val)
    if say is not None:
        why = (f"{rows} training and validation rows" + (f" < {finish.SMALL_ROWS}" if scheme == "kfold" and
                                                         o.validation == "auto" else ""))
        starts = {r.number for r in records if r.config.get("start") == LOGISTIC_START}
        linear = next((t.number for t in planned if t.number in starts), None) if scheme == "kfold" else None
        say(f"finishing ({why}): {scheme} validation, {len(tasks)} models to train to the end "
            f"({epochs} epochs) in the last {o.finish_fraction:.0%} of the time budget"
            + (f"; trial {linear}, the search's logistic-regression start, among them" if linear is not None else ""))
    if tasks:
        common = dict(dataset=str(o.dataset), library=str(library), input_kind=o.input_kind, seed=o.seed,
                      scheme=scheme, folds=o.folds, epochs=epochs, deadline=deadline, threads=threads)
        try:
            run_workers("enserve.tuning.finish", finish.settings_for(tasks, o.workers, **common), progress,
                        progress_every_s)
        except trial_workers.BuildFailed as exc:  # the search's trials are still there to select from
            if say is not None:
                first = str(exc).split("the first said:\n", 1)[-1]
                say(f"finishing failed, so the selection takes the search's trials as they are; a worker said:\n{first}")
        if scheme == "holdout" and say is not None:
            left = sum(not done(t) for t in tasks)
            if left == len(tasks):
                say(f"finishing: none of the {len(tasks)} models was trained to the end within the time budget "
                    "(rerunning the build continues it)")
    if scheme == "kfold":
        import numpy as np

        assembled = finish.assemble(library, np.concatenate([data.y_train, data.y_val, data.y_test]),
                                    len(data.y_train) + len(data.y_val), o.folds, o.seed)
        if not assembled and say is not None:
            say("finishing: no configuration was trained on all its folds within the time budget, so the selection "
                "compares the search's trials on the validation split; a longer --time-budget (or rerunning the "
                "build, which continues) finishes them")
