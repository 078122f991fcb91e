"""How long trials train: the epoch budget, ASHA's first rung and the batch sizes searched, chosen
from the data set's size and the time budget, so that a short build on a small or unfamiliar data
set still trains its best trials to convergence (rather than digits' 9 epochs everywhere).

The rule: a fully trained trial takes about ``STEPS`` optimizer steps at the middle batch size; the
build's time must let about ``FULL_TRIALS`` trials train fully (from one measured epoch of a
middle-sized network); ASHA's first rung is 1/27 of the budget (reduction factor 3: four rungs)."""

from __future__ import annotations

import math
from dataclasses import dataclass

STEPS = 1000  # optimizer steps of a fully trained trial
FULL_TRIALS = 8  # trials the time budget should let train fully (on all workers together)
MIN_EPOCHS, MAX_EPOCHS = 3, 300
BATCH_LOW, BATCH_HIGH = 8, 48
REDUCTION = 3


@dataclass(frozen=True)
class Schedule:
    max_epochs: int
    min_epochs: int  # ASHA's first rung
    batch_low: int
    batch_high: int
    why: str

    def rungs(self) -> list[int]:
        out, r = [], self.min_epochs
        while r <= self.max_epochs:
            out.append(r)
            r *= REDUCTION
        return out

    def describe(self) -> str:
        return (f"up to {self.max_epochs} epochs a trial (ASHA rungs {self.rungs()}), batch sizes "
                f"{self.batch_low}-{self.batch_high}: {self.why}")


def batch_range(n_train: int) -> tuple[int, int]:
    """Batch sizes searched: up to a quarter of the training set, within [8, 48]."""
    high = max(BATCH_LOW, min(BATCH_HIGH, n_train // 4))
    return min(BATCH_LOW, high), high


def choose_schedule(n_train: int, time_budget_s: float, workers: int, epoch_s: float,
                    max_epochs: int | None = None) -> Schedule:
    """The schedule for ``n_train`` training samples, a build of ``time_budget_s`` on ``workers``
    processes, where one epoch of a middle-sized network took ``epoch_s``; ``max_epochs`` forces
    the epoch budget."""
    if n_train < 1:
        raise ValueError(f"the training set has {n_train} samples, but needs at least 1")
    low, high = batch_range(n_train)
    steps_per_epoch = math.ceil(n_train / ((low + high) / 2))
    by_steps = math.ceil(STEPS / steps_per_epoch)
    by_time = math.floor(time_budget_s * workers / (FULL_TRIALS * epoch_s)) if epoch_s > 0 else MAX_EPOCHS
    if max_epochs is not None:
        epochs, why = max_epochs, "--max-epochs"
    else:
        epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, by_steps, by_time))
        limit = "the step target" if by_steps <= by_time else "the time budget"
        why = (f"{n_train} training samples ({steps_per_epoch} steps an epoch; {by_steps} epochs reach {STEPS} "
               f"steps), one epoch took {epoch_s:.2f} s ({by_time} epochs let {FULL_TRIALS} trials finish in "
               f"{time_budget_s:g} s x {workers} workers); {limit} decides")
    return Schedule(epochs, max(1, round(epochs / REDUCTION**3)), low, high, why)
