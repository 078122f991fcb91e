"""The open-loop load generator's pure parts: Poisson arrivals along a schedule, rates relative to
the measured capacity."""

from __future__ import annotations

import numpy as np
import pytest


def test_open_loop_arrivals_follow_the_schedule():
    from enserve.loadtest.sweep import arrival_times, parse_rates

    times = arrival_times([(100.0, 20.0)], seed=3)
    assert np.all(np.diff(times) > 0) and 0 <= times[0] and times[-1] < 20
    assert abs(len(times) - 2000) < 4 * np.sqrt(2000)  # Poisson: 2000 expected, sd ~45
    steps = arrival_times([(50.0, 10.0), (0.0, 5.0), (400.0, 10.0)], seed=1)
    assert not np.any((steps >= 10) & (steps < 15))  # nothing sent at rate 0
    first, last = np.sum(steps < 10), np.sum(steps >= 15)
    assert abs(first - 500) < 4 * np.sqrt(500) and abs(last - 4000) < 4 * np.sqrt(4000)
    np.testing.assert_array_equal(arrival_times([(10.0, 3.0)], seed=5), arrival_times([(10.0, 3.0)], seed=5))
    assert parse_rates("0.5x,2x,30", 100.0) == [50.0, 200.0, 30.0]
    with pytest.raises(ValueError, match="must have a rate and a duration >= 0"):
        arrival_times([(-1.0, 1.0)])



def test_bad_rates_and_schedules_are_refused_in_words():
    from enserve.loadtest.sweep import parse_rates, parse_schedule

    assert parse_schedule("1x:10,30:5", 100.0) == [(100.0, 10.0), (30.0, 5.0)]
    for bad, message in (("fast", "rate 'fast' is not a number"), ("-2x", "rate '-2x' is not a number")):
        with pytest.raises(SystemExit, match=message):
            parse_rates(bad, 100.0)
    with pytest.raises(SystemExit, match="schedule step '2x' must be 'rate:seconds'"):
        parse_schedule("2x", 100.0)
