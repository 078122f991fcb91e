"""What ``enserve select`` and ``enserve build`` take, as keyword-only objects whose fields carry
their flags (``enserve.options``): the selection's options, and the build's, which extend them (a
build ends with a selection). Imports no torch or optuna: the command line reads them for --help."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enserve import combiners
from enserve.options import check_fields, option
from enserve.server.config import DEFAULT_MODEL_REPOSITORY
from enserve.server.errors import RepositoryError
from enserve.server.served.repository import DEFAULT_ENSEMBLE, check_model_name
from enserve.tuning.data import INPUT_KINDS
from enserve.tuning.families import SIGNAL_MIN_LENGTH
from enserve.tuning.finish import FOLDS, SMALL_ROWS, VALIDATIONS
from enserve.tuning.objective import OBJECTIVES
from enserve.tuning.study import PRUNERS, SAMPLERS

METHODS = ("smobf", "greedy", "caruana")


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f"duration '{text}' is invalid: expected e.g. 90s, 10m, 1h") from None


@dataclass(kw_only=True)
class SelectOptions:
    """The selection from a library, and where its ensemble is written."""

    library: Path = option(Path("library"), "--library", "where every trained trial is kept", Path)
    model_repository: Path = option(DEFAULT_MODEL_REPOSITORY, "--model-repository",
                                    "the model repository the ensemble is written into", Path)
    ensemble: str = option(DEFAULT_ENSEMBLE, "--ensemble", "name of the ensemble model in the repository", str)
    budget: float | None = option(None, "--budget", "largest total inference cost of the ensemble, in seconds per "
                                  "2000 samples on one core", float, above=0,
                                  shown="3 x the median cost of the top --prune fraction (k-fold: of every finished "
                                  "configuration), at least 3 x the best single model's")
    method: str = option(METHODS[0], "--method", "SMOBF greedy (w in 0.1, 0.01, 0.001), forward greedy with "
                         "--n-models, or Caruana's selection with replacement (served by the combiner's weighted "
                         "form)", str, choices=METHODS)
    combiner: str = option(combiners.DEFAULT, "--combiner", "how the ensemble combines its members, served and "
                           "scored in the selection alike: " + "; ".join(
                               f"{n}: {combiners.get(n).doc}" for n in combiners.unweighted()),
                           str, choices=tuple(combiners.unweighted()))
    n_models: int = option(5, "--n-models", "models of the forward-greedy baseline", int, minimum=1)
    prune: float = option(0.2, "--prune", "select among the top fraction of the library (k-fold: every finished "
                          "configuration, the library's best already)", float, above=0)
    validation: str = option(VALIDATIONS[0], "--validation", "what the selection compares members on: the "
                             "validation split (holdout), or out-of-fold predictions for every training and validation "
                             "row (kfold: trained in the build's finishing stage, each chosen configuration served as "
                             f"its fold models); auto: kfold below {SMALL_ROWS} rows (for select: when the library "
                             "has them)", str, choices=VALIDATIONS)

    def validate(self) -> None:
        check_fields(self)
        try:  # before a build trains for minutes, not when it writes the ensemble
            check_model_name(self.ensemble)
        except RepositoryError as exc:
            raise ValueError(f"--ensemble: {exc}") from None
        if self.prune > 1:
            raise ValueError(f"--prune is {self.prune}, but must be in (0, 1]")


@dataclass(kw_only=True)
class BuildOptions(SelectOptions):
    """The search that fills the library, then the selection (``SelectOptions``)."""

    dataset: str = option("digits", "--dataset", "digits, or a .npz, .csv, CIFAR archive or image folder", str)
    time_budget_s: float = option(600.0, "--time-budget", "the search's and the finishing's time together, e.g. "
                                  "10m", parse_duration, above=0)
    storage: str | None = option(None, "--storage", "Optuna storage shared by the workers: an RDB URL "
                                 "(postgresql://...) for several machines", str, shown="a journal file in the library")
    study_name: str = option("enserve", "--study-name", "the Optuna study's name in the storage", str)
    workers: int = option(2, "--workers", "worker processes on this machine", int, minimum=1)
    sampler: str = option(SAMPLERS[0], "--sampler", "Optuna's sampler", str, choices=SAMPLERS)
    pruner: str = option(PRUNERS[0], "--pruner", "asynchronous successive halving over epochs, Hyperband, or none",
                         str, choices=PRUNERS)
    max_epochs: int | None = option(None, "--max-epochs", "epochs of a trial that is never stopped; ASHA's rungs at "
                                    "1/27, 1/9, 1/3 of it", int, minimum=1,
                                    shown="from the data set's size and the time budget, printed at the start")
    max_trials: int | None = option(None, "--max-trials", "stop after this many trials in the study (Optuna's "
                                    "n_trials, over every worker)", int, minimum=1, shown="until the time budget")
    seed: int = option(0, "--seed", "the data split's and the samplers' seed", int)
    objective: str = option(OBJECTIVES[0], "--objective", "what the search minimises: the validation loss, or the "
                            "loss plus --cost-weight x the trial's inference cost over a middle-sized network's "
                            "(ASHA compares that sum at every rung)", str, choices=OBJECTIVES)
    cost_weight: float = option(0.1, "--cost-weight", "weight of the cost for --objective error-and-cost", float,
                                above=0)
    folds: int = option(FOLDS, "--folds", "folds of --validation kfold (a library keeps its first)", int, minimum=2)
    finish_fraction: float = option(0.4, "--finish-fraction", "share of the time budget that trains the best "
                                    "configurations to the end (and, for kfold, on every fold) after the search; "
                                    "0: none", float, minimum=0)
    input_kind: str = option(INPUT_KINDS[0], "--input-kind", "how inputs are read: 4-D arrays are images, 3-D "
                             "(N, C, L) signals; 2-D rows are tabular (MLPs) below "
                             f"{SIGNAL_MIN_LENGTH} columns or with a missing "
                             "value, else both MLPs and 1-D CNNs are searched; 'tabular' or 'signal' (one channel) "
                             "says which", str, choices=INPUT_KINDS)

    def validate(self) -> None:
        super().validate()
        if self.finish_fraction >= 1:
            raise ValueError(f"--finish-fraction is {self.finish_fraction}, but must be < 1 (the search needs time)")
