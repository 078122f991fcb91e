"""What training and inference cost here: one epoch's time (for the schedule) and a model's
inference cost (the paper's C: seconds to predict ``COST_SAMPLES`` samples on one core)."""

from __future__ import annotations

import math
import time
from pathlib import Path

from enserve.tuning.space import middle_config

COST_SAMPLES = 2000  # the paper's C: seconds to predict this many samples on one core


def middle_member(data, preprocessing: dict | None):
    """``middle_config``'s network as a member (its preprocessing in front, when there is one)."""
    from enserve.tuning.preprocess import member
    from enserve.tuning.space import timed_family
    from enserve.tuning.train import build_model

    family = timed_family(data)
    net = build_model(middle_config(data, family, preprocessing).network)
    if not preprocessing:
        return net
    return member(family, preprocessing[family], net, data.input_shape)


def epoch_seconds(data, threads: int, batches: int = 20, preprocessing: dict | None = None) -> float:
    """Seconds one training epoch of ``middle_config`` takes here (timed over at most ``batches``
    batches, after one to warm up, and scaled to the whole epoch)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    config = middle_config(data, preprocessing=preprocessing)
    model = middle_member(data, preprocessing)
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


def middle_cost(data, preprocessing: dict | None = None) -> float:
    """The inference cost of ``middle_config``: the reference that --objective error-and-cost divides by."""
    import tempfile

    from enserve.optimizer.profiles import Profiler
    from enserve.tuning.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="enserve-cost-") as tmp, Profiler() as profiler:
        path = export_onnx(middle_member(data, preprocessing), data.input_shape, Path(tmp) / "model.onnx")
        return measure_cost(path, data, profiler)


def measure_cost(onnx_path: Path, data, profiler) -> float:
    """Seconds to predict COST_SAMPLES samples with one core, measured by ``profiler`` (an
    ``optimizer.profiles.Profiler``: a child process, so training does not disturb it)."""
    from enserve.optimizer.profiles import MemberSource

    src = MemberSource(onnx_path.parent.name, str(onnx_path), (("input", "<f4", tuple(data.input_shape)),))
    latency = profiler.measure(src, kind="cpu", threads=1, batch_sizes=(64,), seconds=0.2)["latency_s"][64]
    return latency / 64 * COST_SAMPLES
