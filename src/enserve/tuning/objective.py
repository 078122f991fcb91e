"""One trial, as the study sees it: suggest a configuration, train it rung by rung (the pruner may
stop it), and keep it in the library, pruned or not."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from enserve.tuning.cost import measure_cost
from enserve.tuning.library import TrialRecord, trial_dir, write_record
from enserve.tuning.space import family_of, suggest

OBJECTIVES = ("error", "error-and-cost")


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


def objective(trial, data, library: Path, settings: TrialSettings, profiler, preprocessing: dict | None = None) -> float:
    """Train one suggested configuration as a member (``preprocessing[family]`` in front of its
    network, when given), report its validation loss at every epoch, keep it in the library."""
    import optuna
    import torch

    from enserve.models.counting import flop_count, parameter_count
    from enserve.tuning.export import export_onnx
    from enserve.tuning.selection import cross_entropy, error_rate
    from enserve.tuning.train import TrialDiverged, build_model, predict, train

    seed, data_sha256 = settings.seed, settings.data_sha256
    config = suggest(trial, data, settings.batch_sizes, preprocessing)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which machine trained it
    torch.manual_seed(seed + trial.number)
    model = build_model(config.network)
    family = family_of(config.network)
    if preprocessing:
        from enserve.tuning.preprocess import member

        model = member(family, preprocessing[family], model, data.input_shape)
    penalty = 0.0

    def report(epoch: int, val_loss: float) -> bool:
        trial.report(val_loss + penalty, epoch)
        return trial.should_prune()

    d = trial_dir(library, trial.number)
    d.mkdir(parents=True, exist_ok=True)
    params = {"trial_params": trial.params, "network": asdict(config.network),
              "network_kind": type(config.network).__name__, "family": family}
    if "start" in trial.user_attrs:  # one of the search's starting points (``space.starting_points``)
        params["start"] = trial.user_attrs["start"]
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
