"""Building the library: an Optuna study whose pruner is asynchronous successive halving (or
Hyperband) over epochs, run by worker processes that share the study's storage (a journal file on
one machine, an RDB URL across machines). Every trial, pruned or not, goes into the library."""

from __future__ import annotations

import hashlib
import math
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from enserve.tuning import workers as trial_workers
from enserve.tuning.library import TrialRecord, trial_dir, write_record

OBJECTIVES = ("error", "error-and-cost")
COST_SAMPLES = 2000  # the paper's C: seconds to predict this many samples on one core
SAMPLERS = ("random", "tpe", "gp", "nsga2")
PRUNERS = ("asha", "hyperband", "none")


def make_storage(storage: str, attempts: int = 6):
    """An RDB URL (postgresql://..., sqlite:///...) opens an ``RDBStorage``; any other string is a
    journal file path. Builders that start on a fresh database at the same moment race to create
    its tables (optuna/optuna#1092: "duplicate key value violates unique constraint
    pg_type_typname_nsp_index"); the loser tries again and then finds them made."""
    import optuna
    import sqlalchemy.exc

    if "://" in storage:
        for attempt in range(attempts):
            try:
                return optuna.storages.RDBStorage(storage)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))


def make_sampler(name: str, seed: int | None):
    import optuna

    samplers = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler,
                "gp": optuna.samplers.GPSampler, "nsga2": optuna.samplers.NSGAIISampler}
    if name not in samplers:
        raise ValueError(f"sampler '{name}' is not one of {SAMPLERS}")
    return samplers[name](seed=seed)


def make_pruner(name: str, max_epochs: int, min_epochs: int = 1):
    import optuna

    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=max_epochs, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner '{name}' is not one of {PRUNERS}")


@dataclass(frozen=True)
class AugmentationBounds:
    """Upper ends of the augmentation ranges searched (each drawn in [0, bound])."""

    zoom: float
    translation: float
    shear: float
    channel_shift: float
    rotation: int


TABLE5_AUGMENTATION = AugmentationBounds(zoom=0.6, translation=0.6, shear=0.3, channel_shift=0.3, rotation=90)
# Below 32 px the paper's ranges destroy the content (a 0.6 shift moves an 8x8 digit out of the
# frame, a 90-degree turn makes a 6 a 9): measured on digits, Table 5's ranges gave 16-25 % error
# after 9 epochs where these gave 1-2 %.
SMALL_IMAGE_AUGMENTATION = AugmentationBounds(zoom=0.15, translation=0.15, shear=0.15, channel_shift=0.1, rotation=15)
SMALL_IMAGE_PX = 32


def augmentation_bounds(input_shape: tuple[int, ...]) -> AugmentationBounds:
    """Table 5's ranges for images of at least SMALL_IMAGE_PX pixels a side, narrower ones below."""
    return TABLE5_AUGMENTATION if min(input_shape[-2:]) >= SMALL_IMAGE_PX else SMALL_IMAGE_AUGMENTATION


def suggest(trial, data, batch_sizes: tuple[int, int] = (8, 48)):
    """Table 5's space, scaled to what a CPU trains in minutes (filters [8, 32], 1-2 blocks a stage,
    L2 <= 1e-3) and, for small images, narrower augmentations (``augmentation_bounds``); batch sizes
    from ``batch_sizes`` (the schedule's, which follows the data set's size)."""
    from enserve.models.mlp import MLPConfig
    from enserve.models.resnet import ResNetConfig
    from enserve.tuning.augment import Augmentation
    from enserve.tuning.train import TrialConfig

    lr = trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)
    batch = trial.suggest_int("batch_size", *batch_sizes)
    l2 = trial.suggest_float("l2", 0.0, 1e-3)
    if data.kind == "tabular":
        width = trial.suggest_int("width", 16, 256, log=True)
        depth = trial.suggest_int("depth", 1, 3)
        net = MLPConfig(features=int(np.prod(data.input_shape)), classes=data.classes, hidden=(width,) * depth,
                        activation=trial.suggest_categorical("activation", ["tanh", "relu", "elu"]),
                        dropout=trial.suggest_float("dropout", 0.0, 0.5))
        return TrialConfig(net, lr, batch, l2)
    if data.kind == "signal":
        from enserve.models.resnet1d import KERNELS, ResNet1dConfig

        net = ResNet1dConfig(
            in_channels=data.input_shape[0], classes=data.classes,
            filters=trial.suggest_int("filters", 8, 32), filter_step=trial.suggest_int("filter_step", 0, 32),
            blocks=tuple(trial.suggest_int(f"blocks_{k}", 1, 2) for k in range(3)),
            kernel=trial.suggest_categorical("kernel", list(KERNELS)),
            activation=trial.suggest_categorical("activation", ["tanh", "relu", "elu"]))
        return TrialConfig(net, lr, batch, l2)
    net = ResNetConfig(
        block=trial.suggest_categorical("block", ["v1", "v2", "next"]),
        activation=trial.suggest_categorical("activation", ["tanh", "relu", "elu"]),
        filters=trial.suggest_int("filters", 8, 32),
        filter_step=trial.suggest_int("filter_step", 8, 32),
        blocks=tuple(trial.suggest_int(f"blocks_{k}", 1, 2) for k in range(4)),
        in_channels=data.input_shape[0], classes=data.classes,
        small_input=data.input_shape[-1] <= 64,
    )
    b = augmentation_bounds(data.input_shape)
    aug = Augmentation(zoom=trial.suggest_float("zoom", 0.0, b.zoom),
                       translation=trial.suggest_float("translation", 0.0, b.translation),
                       shear=trial.suggest_float("shear", 0.0, b.shear),
                       channel_shift=trial.suggest_float("channel_shift", 0.0, b.channel_shift),
                       rotation=trial.suggest_int("rotation", 0, b.rotation))
    return TrialConfig(net, lr, batch, l2, aug)


def middle_config(data):
    """A middle-sized network of the data set's family: what the schedule times one epoch of."""
    from enserve.models.mlp import MLPConfig
    from enserve.models.resnet import ResNetConfig
    from enserve.models.resnet1d import ResNet1dConfig
    from enserve.tuning.train import TrialConfig

    if data.kind == "tabular":
        net = MLPConfig(features=int(np.prod(data.input_shape)), classes=data.classes, hidden=(64, 64))
    elif data.kind == "signal":
        net = ResNet1dConfig(in_channels=data.input_shape[0], classes=data.classes, filters=20, filter_step=16)
    else:
        net = ResNetConfig(filters=20, filter_step=20, in_channels=data.input_shape[0], classes=data.classes,
                           small_input=data.input_shape[-1] <= 64)
    return TrialConfig(net, 3e-3, 28, 0.0)


def epoch_seconds(data, threads: int, batches: int = 20) -> float:
    """Seconds one training epoch of ``middle_config`` takes here (timed over at most ``batches``
    batches, after one to warm up, and scaled to the whole epoch)."""
    import torch
    import torch.nn.functional as F

    from enserve.tuning.train import build_model

    torch.set_num_threads(threads)
    config = middle_config(data)
    model = build_model(config.network)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    steps = math.ceil(len(x) / config.batch_size)
    timed = min(batches, steps)
    t0 = 0.0
    for k in range(timed + 1):
        if k == 1:
            t0 = time.perf_counter()
        lo = (k % steps) * config.batch_size
        loss = F.cross_entropy(model(x[lo : lo + config.batch_size]), y[lo : lo + config.batch_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - t0) / timed * steps


def middle_cost(data) -> float:
    """The inference cost of ``middle_config``: the reference that --objective error-and-cost divides by."""
    import tempfile

    from enserve.optimizer.profiles import Profiler
    from enserve.tuning.export import export_onnx
    from enserve.tuning.train import build_model

    with tempfile.TemporaryDirectory(prefix="enserve-cost-") as tmp, Profiler() as profiler:
        path = export_onnx(build_model(middle_config(data).network), data.input_shape, Path(tmp) / "model.onnx")
        return measure_cost(path, data, profiler)


def measure_cost(onnx_path: Path, data, profiler) -> float:
    """Seconds to predict COST_SAMPLES samples with one core, measured by ``profiler`` (an
    ``optimizer.profiles.Profiler``: a child process, so training does not disturb it)."""
    from enserve.optimizer.profiles import MemberSource

    src = MemberSource(onnx_path.parent.name, str(onnx_path), (("input", "<f4", tuple(data.input_shape)),))
    latency = profiler.measure(src, kind="cpu", threads=1, batch_sizes=(64,), seconds=0.2)["latency_s"][64]
    return latency / 64 * COST_SAMPLES


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a worker shares. With ``cost_weight`` > 0 (``--objective error-and-cost``)
    a trial's inference cost is measured before it trains (it depends on the architecture only),
    and what ASHA compares at every rung, and the study minimises, is
    ``val_loss + cost_weight * cost / cost_ref``: successive halving and the second objective live
    together as one scalar, so the pruner still works (Optuna's pruners take one objective)."""

    max_epochs: int
    seed: int
    batch_sizes: tuple[int, int] = (8, 48)
    data_sha256: str = ""
    cost_weight: float = 0.0
    cost_ref: float = 1.0  # seconds: the cost of ``middle_config``, measured once per study


class TrialFailed(Exception):
    """A trial that diverged or whose model could not be exported or measured: recorded as failed;
    the search goes on."""


def objective(trial, data, library: Path, settings: TrialSettings, profiler) -> float:
    import optuna
    import torch

    from enserve.models.counting import flop_count, parameter_count
    from enserve.tuning.export import export_onnx
    from enserve.tuning.selection import cross_entropy, error_rate
    from enserve.tuning.train import TrialDiverged, build_model, predict, train

    seed, data_sha256 = settings.seed, settings.data_sha256
    config = suggest(trial, data, settings.batch_sizes)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which machine trained it
    torch.manual_seed(seed + trial.number)
    model = build_model(config.network)
    penalty = 0.0

    def report(epoch: int, val_loss: float) -> bool:
        trial.report(val_loss + penalty, epoch)
        return trial.should_prune()

    d = trial_dir(library, trial.number)
    d.mkdir(parents=True, exist_ok=True)
    params = {"trial_params": trial.params, "network": asdict(config.network), "network_kind": type(config.network).__name__}
    try:
        if settings.cost_weight > 0:  # the cost is the architecture's: known before training, seen at every rung
            cost = measure_cost(export_onnx(model, data.input_shape, d / "model.onnx"), data, profiler)
            penalty = settings.cost_weight * cost / settings.cost_ref
        result = train(model, data, config, epochs=settings.max_epochs, report=report, seed=seed + trial.number)
        val_pred, test_pred = predict(model, data.x_val), predict(model, data.x_test)
        val_loss, val_error = cross_entropy(val_pred, data.y_val), error_rate(val_pred, data.y_val)
        test_error = error_rate(test_pred, data.y_test)
        np.save(d / "val_pred.npy", val_pred, allow_pickle=False)
        np.save(d / "test_pred.npy", test_pred, allow_pickle=False)
        np.savez(d / "weights.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
        onnx_path = export_onnx(model, data.input_shape, d / "model.onnx", check=data.x_test[:32])
        if settings.cost_weight <= 0:
            cost = measure_cost(onnx_path, data, profiler)
    except (TrialDiverged, RuntimeError) as exc:  # diverged, or its export / cost measurement failed
        write_record(library, TrialRecord(trial.number, "failed", params, 0, [], float("nan"), 1.0, 1.0,
                                          float("nan"), parameter_count(model), 0, d.name, str(exc), data_sha256))
        raise TrialFailed(str(exc)) from exc
    record = TrialRecord(trial.number, "pruned" if result.pruned else "complete", params, result.epochs,
                         result.curve, val_loss, val_error, test_error, cost,
                         parameter_count(model), flop_count(model, data.input_shape), d.name, "", data_sha256)
    write_record(library, record)
    if result.pruned:
        raise optuna.TrialPruned(f"stopped at epoch {result.epochs}")
    return val_loss + penalty


def sampler_seed(seed: int, index: int, storage: str) -> int:
    """The sampler's seed of worker ``index``: from ``seed`` and ``index`` alone when the study is
    this machine's (with one worker, the same seed gives the same trials); with an RDB shared by
    several machines also from the host and process, so that no two builders draw the same
    configurations (every machine runs with the same ``--seed``, which fixes the data split)."""
    if "://" not in storage:
        return seed * 1000 + index
    key = f"{seed}:{index}:{socket.gethostname()}:{os.getpid()}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def default_storage(library: Path) -> str:
    """The study's journal file inside the library (without ``--storage``)."""
    return str(Path(library) / "study.journal")


def running_trials(storage: str, study_name: str = "enserve") -> int | None:
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    except Exception:  # not created yet, or the storage is busy: the progress line just omits it
        return None
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def build_library(dataset: str, library: Path, *, storage: str | None = None, study_name: str = "enserve",
                  sampler: str = "random", pruner: str = "asha", workers: int = 1, time_budget_s: float = 600,
                  max_epochs: int | None = None, seed: int = 0, max_trials: int | None = None,
                  progress=None, progress_every_s: float = 10.0, input_kind: str = "auto",
                  on_schedule=None, objective: str = "error", cost_weight: float = 0.1) -> str:
    """Create (or continue) the study and run ``workers`` processes on it until the time budget.
    The epoch budget, ASHA's rungs and the batch sizes follow the data and the time budget
    (``schedule``) unless ``max_epochs`` forces the budget; a continued study keeps its schedule.
    ``on_schedule(Schedule)`` hears what was chosen. ``objective`` 'error-and-cost' adds the
    inference cost to what the search minimises (``TrialSettings``); a study keeps its objective."""
    import optuna

    from enserve.tuning.data import describe, fingerprint, load_dataset, same_data
    from enserve.tuning.library import claim_library, write_labels
    from enserve.tuning.schedule import Schedule, choose_schedule

    if objective not in OBJECTIVES:
        raise ValueError(f"objective '{objective}' is not one of {OBJECTIVES}")
    if not cost_weight > 0:
        raise ValueError(f"cost_weight is {cost_weight}, but must be > 0")
    if max_epochs is not None and max_epochs < 1:
        raise ValueError(f"max_epochs is {max_epochs}, but must be >= 1")
    if workers < 1:
        raise ValueError(f"workers is {workers}, but must be >= 1")
    library = Path(library)
    library.mkdir(parents=True, exist_ok=True)
    data = load_dataset(dataset, seed=seed, input_kind=input_kind)
    fp = fingerprint(data, seed)
    claim_library(library, fp, data.y_val, data.y_test)  # refuses another data set's library
    storage = storage or default_storage(library)
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
        epoch_s = epoch_seconds(data, threads) if max_epochs is None else 0.0
        schedule = choose_schedule(len(data.x_train), time_budget_s, workers, epoch_s, max_epochs)
        study.set_user_attr("schedule", asdict(schedule))
    if on_schedule is not None:
        on_schedule(schedule)
    goal = study.user_attrs.get("objective")
    if goal is None:
        goal = {"kind": objective, "cost_weight": 0.0, "cost_ref": 1.0}
        if objective == "error-and-cost":
            goal |= {"cost_weight": cost_weight, "cost_ref": middle_cost(data)}
        study.set_user_attr("objective", goal)
    elif goal["kind"] != objective:
        raise ValueError(f"the study '{study_name}' in {storage} minimises '{goal['kind']}', not '{objective}': "
                         "a study keeps its objective; use another library (or --storage) for the other one")
    max_epochs = schedule.max_epochs
    deadline = time.time() + time_budget_s
    kwargs = [dict(storage=storage, study_name=study_name, dataset=dataset, library=str(library), deadline=deadline,
                   max_epochs=max_epochs, threads=threads, seed=seed, max_trials=max_trials, input_kind=input_kind,
                   index=i) for i in range(workers)]
    started = trial_workers.start(kwargs)
    try:
        trial_workers.watch(started, progress=progress, progress_every_s=progress_every_s)
    finally:
        trial_workers.stop(started)  # on an interrupt or a failure: none is left running
    return storage
