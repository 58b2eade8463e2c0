"""Unit tests for bench/load.py's reading of the service's event-loop lag histogram."""

from __future__ import annotations

import math

import pytest

from bench.load import loop_lag

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

INF = math.inf


def test_the_window_s_ticks_are_the_histogram_s_growth() -> None:
    before = {0.005: 90.0, 0.025: 98.0, 0.05: 99.0, 0.1: 100.0, INF: 100.0}
    # 600 ticks in the window: 590 at most 5 ms late, 1 in (5, 25] ms, 5 in (25, 50],
    # 1 in (50, 100], 3 later; the 594th (99%) is in the 50 ms bucket
    after = {0.005: 680.0, 0.025: 689.0, 0.05: 695.0, 0.1: 697.0, INF: 700.0}
    got = loop_lag(before, after)
    assert got == {"ticks": 600, "over_25ms": 9, "over_50ms": 4, "p99_under_ms": 50.0}


def test_a_tail_past_every_bucket_and_no_reading() -> None:
    before = {0.05: 0.0, INF: 0.0}
    after = {0.05: 90.0, INF: 100.0}  # 10% of the ticks later than the last finite bound
    assert loop_lag(before, after)["p99_under_ms"] == INF
    assert loop_lag({}, after) == {"ticks": 0}
