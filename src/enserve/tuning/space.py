"""The search space: per data kind, the network family's hyperparameters (and for images the
augmentation ranges), as an Optuna trial suggests them; and the middle-sized network the schedule
and the cost objective measure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
