"""The build's schedule (epoch budget, ASHA rungs, batch sizes) from the data and the time: known answers."""

from __future__ import annotations

import pytest

from enserve.tuning.schedule import batch_range, choose_schedule


def test_a_tiny_data_set_trains_many_epochs_of_small_batches():
    # 40 samples: batches 8-10 (middle 9), 5 steps an epoch, 200 epochs reach 1000 steps; time allows 3000
    s = choose_schedule(40, 240, 2, epoch_s=0.02)
    assert (s.max_epochs, s.min_epochs, s.batch_low, s.batch_high) == (200, 7, 8, 10)
    assert s.rungs() == [7, 21, 63, 189]
    assert "40 training samples (5 steps an epoch; 200 epochs reach 1000 steps)" in s.describe()
    assert "the step target decides" in s.why


def test_a_larger_data_set_needs_fewer_epochs_and_time_can_decide():
    s = choose_schedule(4000, 240, 2, epoch_s=2.0)  # 143 steps an epoch: 7 epochs; time allows 30
    assert (s.max_epochs, s.min_epochs, s.batch_low, s.batch_high) == (7, 1, 8, 48)
    slow = choose_schedule(400, 60, 1, epoch_s=1.0)  # 15 steps an epoch: 67 epochs, but time allows 7
    assert slow.max_epochs == 7 and "the time budget decides" in slow.why
    floor = choose_schedule(40000, 600, 2, epoch_s=60.0)  # 1 epoch reaches the steps, time allows 2: at least 3
    assert floor.max_epochs == 3


def test_forced_epochs_and_bad_sizes():
    s = choose_schedule(1000, 60, 1, epoch_s=0.0, max_epochs=9)
    assert (s.max_epochs, s.rungs(), s.why) == (9, [1, 3, 9], "--max-epochs")
    assert batch_range(10) == (8, 8) and batch_range(100) == (8, 25) and batch_range(10**6) == (8, 48)
    with pytest.raises(ValueError, match="the training set has 0 samples, but needs at least 1"):
        choose_schedule(0, 60, 1, epoch_s=1.0)
