"""One trial: build a network from its configuration, train it epoch by epoch (reporting the
validation loss so a pruner can stop it), and predict probabilities."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from enserve.models.mlp import MLP, MLPConfig
from enserve.models.resnet import ResNet, ResNetConfig
from enserve.tuning.augment import Augmentation, augment
from enserve.tuning.data import Dataset
from enserve.tuning.preprocess import Member


class TrialDiverged(Exception):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class TrialConfig:
    network: ResNetConfig | MLPConfig
    learning_rate: float = 1e-3
    batch_size: int = 32
    l2: float = 0.0
    augmentation: Augmentation = Augmentation()


@dataclass
class TrainResult:
    epochs: int
    curve: list[dict] = field(default_factory=list)  # per epoch: losses, val_error, learning rate at its end
    pruned: bool = False


def build_model(network: ResNetConfig | MLPConfig) -> nn.Module:
    from enserve.models.resnet1d import ResNet1d, ResNet1dConfig

    if isinstance(network, ResNet1dConfig):
        return ResNet1d(network)
    return ResNet(network) if isinstance(network, ResNetConfig) else MLP(network)


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities, in eval mode, in batches."""
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(x), batch_size):
            out.append(F.softmax(model(torch.from_numpy(x[lo : lo + batch_size])), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(cross-entropy, error rate)."""
    probs = predict(model, x)
    picked = probs[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0)))), float(np.mean(probs.argmax(1) != y))


def train(
    model: nn.Module,
    data: Dataset,
    config: TrialConfig,
    *,
    epochs: int,
    start_epoch: int = 0,
    report: Callable[[int, float], bool] | None = None,
    seed: int = 0,
    schedule_epochs: int | None = None,
) -> TrainResult:
    """Train ``epochs`` more epochs. After each, ``report(epoch, val_loss)`` may return True to stop
    (a pruner's decision). Raises TrialDiverged on a NaN/inf loss.

    The learning rate follows a cosine from ``config.learning_rate`` to 0 over ``schedule_epochs``
    (default: ``start_epoch + epochs``), the trial's whole budget: a trial stopped at an early rung
    simply never reaches the low rates, as in Hyperband's own experiments."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.l2, foreach=True)
    horizon = schedule_epochs if schedule_epochs is not None else start_epoch + epochs
    if epochs < 1:
        raise ValueError(f"epochs is {epochs}, but must be >= 1")
    if horizon < start_epoch + epochs:
        raise ValueError(f"schedule_epochs is {horizon}, but must be >= start_epoch + epochs = {start_epoch + epochs}")
    steps_per_epoch = math.ceil(len(data.x_train) / config.batch_size)
    first, total_steps = start_epoch * steps_per_epoch, horizon * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(first + step, total_steps) / total_steps)))
    x_train = torch.from_numpy(data.x_train)
    y_train = torch.from_numpy(data.y_train)
    result = TrainResult(start_epoch)

    def forward(xb: torch.Tensor) -> torch.Tensor:
        """Logits of a training batch; images are augmented after the member's preprocessing (the
        ranges are in the scaled units) and before its network."""
        if isinstance(model, Member):
            h = model.prepared(xb)
            return model.net(augment(h, config.augmentation, generator) if data.kind == "image" else h)
        return model(augment(xb, config.augmentation, generator) if data.kind == "image" else xb)

    for epoch in range(start_epoch + 1, start_epoch + epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total, seen = 0.0, 0
        for lo in range(0, len(order), config.batch_size):
            idx = order[lo : lo + config.batch_size]
            if len(idx) == 1 and lo:  # a lone last sample: batch norm cannot normalise one value
                continue
            loss = F.cross_entropy(forward(x_train[idx]), y_train[idx])
            if not math.isfinite(loss.item()):
                raise TrialDiverged(f"training loss became {loss.item()} at epoch {epoch}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        val_loss, val_error = evaluate(model, data.x_val, data.y_val)
        result.epochs = epoch
        result.curve.append({"epoch": epoch, "train_loss": total / max(1, seen), "val_loss": val_loss,
                             "val_error": val_error, "learning_rate": optimizer.param_groups[0]["lr"]})
        if report is not None and report(epoch, val_loss):
            result.pruned = True
            break
    return result
