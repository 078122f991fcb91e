"""The search space: per data kind, the network family's hyperparameters (and for images the
augmentation ranges), as an Optuna trial suggests them; and the middle-sized network the schedule
and the cost objective measure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from enserve.tuning.families import KIND_FAMILY


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


def family_of(network) -> str:
    """The family of a network configuration."""
    from enserve.models.mlp import MLPConfig
    from enserve.models.resnet1d import ResNet1dConfig

    return "mlp" if isinstance(network, MLPConfig) else "cnn1d" if isinstance(network, ResNet1dConfig) else "cnn2d"


def network_input(data, family: str, preprocessing: dict | None) -> tuple[int, ...]:
    """What the family's network reads (no batch axis): the preprocessed view of the raw inputs."""
    from enserve.tuning.families import network_view

    view = network_view(family, data.input_shape)
    return preprocessing[family].features_out(view) if preprocessing and family in preprocessing else view


def suggest(trial, data, batch_sizes: tuple[int, int] = (8, 48), preprocessing: dict | None = None):
    """One configuration: the family (when the data set searches several), then its space.

    - ``mlp`` (tabular rows): width 16-512 (log), 0-4 hidden layers, dropout 0-0.5, batch norm or
      not, weight decay 1e-6-1e-2 (log; Adam's L2, as the other families'), learning rate
      1e-4-1e-2 (log): the choices the published tabular MLP baselines tune (Kadra et al. 2021;
      Gorishniy et al. 2021), sized for a CPU; no hidden layer is multinomial logistic regression
      on the scaled columns, the data scientist's first try, which small linear data sets favour.
    - ``cnn1d`` / ``cnn2d``: Table 5's space, scaled to what a CPU trains in minutes (filters [8, 32],
      1-2 blocks a stage, L2 <= 1e-3) and, for small images, narrower augmentations
      (``augmentation_bounds``).

    Batch sizes from ``batch_sizes`` (the schedule's, which follows the data set's size); the
    network's input is the family's preprocessed view (``network_input``)."""
    from enserve.models.mlp import MLPConfig
    from enserve.models.resnet import ACTIVATIONS, ResNetConfig
    from enserve.tuning.augment import Augmentation
    from enserve.tuning.train import TrialConfig

    families = data.families or (KIND_FAMILY[data.kind],)
    family = trial.suggest_categorical("family", list(families)) if len(families) > 1 else families[0]
    shape = network_input(data, family, preprocessing)
    activations = list(ACTIVATIONS)
    batch = trial.suggest_int("batch_size", *batch_sizes)
    if family == "mlp":
        lr = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
        l2 = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        width = trial.suggest_int("width", 16, 512, log=True)
        depth = trial.suggest_int("depth", 0, 4)
        net = MLPConfig(features=int(np.prod(shape)), classes=data.classes, hidden=(width,) * depth,
                        activation=trial.suggest_categorical("activation", activations),
                        dropout=trial.suggest_float("dropout", 0.0, 0.5),
                        batch_norm=trial.suggest_categorical("batch_norm", [False, True]))
        return TrialConfig(net, lr, batch, l2)
    lr = trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)
    l2 = trial.suggest_float("l2", 0.0, 1e-3)
    if family == "cnn1d":
        from enserve.models.resnet1d import KERNELS, ResNet1dConfig

        net = ResNet1dConfig(
            in_channels=shape[0], classes=data.classes,
            filters=trial.suggest_int("filters", 8, 32), filter_step=trial.suggest_int("filter_step", 0, 32),
            blocks=tuple(trial.suggest_int(f"blocks_{k}", 1, 2) for k in range(3)),
            kernel=trial.suggest_categorical("kernel", list(KERNELS)),
            activation=trial.suggest_categorical("activation", activations))
        return TrialConfig(net, lr, batch, l2)
    net = ResNetConfig(
        block=trial.suggest_categorical("block", ["v1", "v2", "next"]),
        activation=trial.suggest_categorical("activation", activations),
        filters=trial.suggest_int("filters", 8, 32),
        filter_step=trial.suggest_int("filter_step", 8, 32),
        blocks=tuple(trial.suggest_int(f"blocks_{k}", 1, 2) for k in range(4)),
        in_channels=shape[0], classes=data.classes,
        small_input=shape[-1] <= 64,
    )
    b = augmentation_bounds(shape)
    aug = Augmentation(zoom=trial.suggest_float("zoom", 0.0, b.zoom),
                       translation=trial.suggest_float("translation", 0.0, b.translation),
                       shear=trial.suggest_float("shear", 0.0, b.shear),
                       channel_shift=trial.suggest_float("channel_shift", 0.0, b.channel_shift),
                       rotation=trial.suggest_int("rotation", 0, b.rotation))
    return TrialConfig(net, lr, batch, l2, aug)


LOGISTIC_START = "logistic_regression"  # the starting point a small data set's finishing always trains


def starting_points(data, batch_sizes: tuple[int, int]) -> dict[str, dict]:
    """Configurations the search tries first (Optuna's ``enqueue_trial``), as AutoML systems start
    from a portfolio of known-good defaults; the sampler takes over after them. For tabular rows:
    logistic regression on the scaled columns (no hidden layer, weight decay 1e-3: about
    scikit-learn's C=1 on a few hundred rows; Adam at the space's top rate, 1e-2, since at 3e-3 its
    few hundred steps left it short of convergence: out-of-fold log loss on penguins 0.126 against
    scikit-learn's 0.032, 0.042 at 1e-2), the data scientist's first try, and the tabular MLP
    baselines' usual default (2 x 256, dropout 0.1, Adam at 1e-3). None for the CNN families, whose
    space is centred already. Named (the search marks each enqueued trial with its name, which its
    library record keeps as ``config["start"]``); the first is ``LOGISTIC_START``."""
    families = data.families or (KIND_FAMILY[data.kind],)
    if "mlp" not in families:
        return {}
    low, high = batch_sizes
    base = {"batch_size": min(max(32, low), high), "activation": "relu", "batch_norm": False}
    if len(families) > 1:
        base["family"] = "mlp"
    return {LOGISTIC_START: base | {"learning_rate": 1e-2, "weight_decay": 1e-3, "width": 64, "depth": 0,
                                    "dropout": 0.0},
            "mlp_default": base | {"learning_rate": 1e-3, "weight_decay": 1e-5, "width": 256, "depth": 2,
                                   "dropout": 0.1}}


def timed_family(data) -> str:
    """The family the schedule times an epoch of: the costliest one searched (CNNs over the MLP)."""
    from enserve.tuning.families import FAMILIES

    families = data.families or ("mlp",)
    return max(families, key=FAMILIES.index)


def middle_config(data, family: str | None = None, preprocessing: dict | None = None):
    """A middle-sized network of ``family`` (default ``timed_family``): what the schedule times one
    epoch of, and what the cost objective's reference is."""
    from enserve.models.mlp import MLPConfig
    from enserve.models.resnet import ResNetConfig
    from enserve.models.resnet1d import ResNet1dConfig
    from enserve.tuning.train import TrialConfig

    family = family or timed_family(data)
    shape = network_input(data, family, preprocessing)
    if family == "mlp":
        net = MLPConfig(features=int(np.prod(shape)), classes=data.classes, hidden=(64, 64))
    elif family == "cnn1d":
        net = ResNet1dConfig(in_channels=shape[0], classes=data.classes, filters=20, filter_step=16)
    else:
        net = ResNetConfig(filters=20, filter_step=20, in_channels=shape[0], classes=data.classes,
                           small_input=shape[-1] <= 64)
    return TrialConfig(net, 3e-3, 28, 0.0)


def config_from_record(record):
    """The ``TrialConfig`` a library trial was trained with, from its record (the network's fields
    and the trial's parameters): what finishing trains again."""
    from enserve.models.mlp import MLPConfig
    from enserve.models.resnet import ResNetConfig
    from enserve.models.resnet1d import ResNet1dConfig
    from enserve.tuning.augment import Augmentation
    from enserve.tuning.train import TrialConfig

    kinds = {"MLPConfig": MLPConfig, "ResNetConfig": ResNetConfig, "ResNet1dConfig": ResNet1dConfig}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record.config["network"].items()}
    network = kinds[record.config["network_kind"]](**fields)
    p = record.config["trial_params"]
    l2 = p.get("weight_decay", p.get("l2", 0.0))
    aug = Augmentation(**{k: p[k] for k in ("zoom", "translation", "shear", "channel_shift", "rotation") if k in p})
    return TrialConfig(network, p["learning_rate"], p["batch_size"], l2, aug)
