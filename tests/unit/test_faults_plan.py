"""Unit tests for the fault plan (actors/faults/: plan, worker side, delay; pure, no Ray):
delay distributions, seeded target resolution, and fault windows in steps and in seconds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from actors.faults import ActiveFault, WorkerFaults, bind_plan, resolve_targets
from core.spec import FaultSpec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

DRAWS = 20_000


def _faults(worker: int, *specs: dict[str, Any], seed: int = 0) -> WorkerFaults:
    plan = bind_plan([FaultSpec(**s) for s in specs], list(range(4)), seed)
    return WorkerFaults(plan, worker, seed)


def _delays(wf: WorkerFaults, n: int = DRAWS) -> np.ndarray:
    return np.array([wf.delay_s(step, 0.0) for step in range(n)])


# -- delay distributions --------------------------------------------------------------------


def test_constant_delay_is_exact() -> None:
    wf = _faults(1, {"kind": "delay", "workers": [1], "delay_ms": 40.0})
    d = _delays(wf, 100)
    assert np.all(d == 0.04)


@pytest.mark.parametrize(
    ("distribution", "shape"), [("exponential", 1.5), ("pareto", 3.0), ("pareto", 5.0)]
)
def test_random_delays_have_mean_delay_ms(distribution: str, shape: float) -> None:
    wf = _faults(
        0,
        {
            "kind": "delay",
            "workers": [0],
            "delay_ms": 20.0,
            "distribution": distribution,
            "pareto_shape": shape,
        },
    )
    d = _delays(wf)
    assert np.all(d >= 0.0)
    # 20,000 draws: the standard error of the mean is below 1.5% for these shapes
    assert d.mean() == pytest.approx(0.020, rel=0.05)
    assert d.std() > 0.0


def test_exponential_delay_has_the_exponential_spread() -> None:
    wf = _faults(
        0, {"kind": "delay", "workers": [0], "delay_ms": 10.0, "distribution": "exponential"}
    )
    d = _delays(wf)
    assert d.std() == pytest.approx(0.010, rel=0.05)  # std = mean for an exponential
    assert np.median(d) == pytest.approx(0.010 * np.log(2), rel=0.05)


def test_heavy_tailed_pareto_delay_has_its_minimum_and_median() -> None:
    # shape a = 1.5 (the default, infinite variance): minimum m = mean (a-1)/a, and the
    # median of a Pareto(a, m) is m 2^(1/a); the sample mean converges too slowly to test
    a, mean_s = 1.5, 0.030
    m = mean_s * (a - 1.0) / a
    wf = _faults(0, {"kind": "delay", "workers": [0], "delay_ms": 30.0, "distribution": "pareto"})
    d = _delays(wf)
    assert d.min() >= m * (1 - 1e-9)
    assert np.median(d) == pytest.approx(m * 2 ** (1 / a), rel=0.05)
    assert d.max() > 10 * mean_s  # a heavy tail shows in 20,000 draws


def test_delays_are_seeded_per_worker() -> None:
    spec = {"kind": "delay", "count": 4, "delay_ms": 10.0, "distribution": "exponential"}
    a = _delays(_faults(2, spec, seed=5), 50)
    b = _delays(_faults(2, spec, seed=5), 50)
    c = _delays(_faults(3, spec, seed=5), 50)
    d = _delays(_faults(2, spec, seed=6), 50)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)


def test_delays_add_up_and_spare_untargeted_workers() -> None:
    specs = (
        {"kind": "delay", "workers": [1], "delay_ms": 10.0},
        {"kind": "delay", "workers": [1, 2], "delay_ms": 5.0},
    )
    assert _faults(1, *specs).delay_s(0, 0.0) == pytest.approx(0.015)
    assert _faults(2, *specs).delay_s(0, 0.0) == pytest.approx(0.005)
    assert _faults(0, *specs).delay_s(0, 0.0) == 0.0


# -- targets ---------------------------------------------------------------------------------


def test_explicit_targets_and_default_all() -> None:
    ids = [0, 1, 2, 3]
    assert resolve_targets(FaultSpec(kind="crash", workers=[2, 0], at_step=1), ids, 0, 0) == [2, 0]
    assert resolve_targets(FaultSpec(kind="crash", at_step=1), ids, 0, 0) == ids


def test_count_targets_are_seeded_and_deterministic() -> None:
    ids = list(range(16))
    fault = FaultSpec(kind="crash", count=3, at_step=5)
    first = resolve_targets(fault, ids, seed=42, index=0)
    assert first == resolve_targets(fault, ids, seed=42, index=0)
    assert len(first) == 3 and len(set(first)) == 3
    assert set(first) <= set(ids) and first == sorted(first)
    # other seeds (or another fault of the plan) pick other workers, some of the time
    others = {tuple(resolve_targets(fault, ids, seed=s, index=0)) for s in range(20)}
    assert len(others) > 1
    by_index = {tuple(resolve_targets(fault, ids, seed=42, index=i)) for i in range(20)}
    assert len(by_index) > 1


def test_count_is_capped_by_the_workers_there_are() -> None:
    fault = FaultSpec(kind="crash", count=10, at_step=1)
    assert resolve_targets(fault, [0, 1, 2], seed=0, index=0) == [0, 1, 2]


def test_bind_plan_numbers_faults_and_resolves_once() -> None:
    specs = [
        FaultSpec(kind="crash", count=1, at_step=3),
        FaultSpec(kind="delay", count=2, delay_ms=5.0),
    ]
    plan = bind_plan(specs, [0, 1, 2, 3], seed=9)
    assert [f.index for f in plan] == [0, 1]
    assert plan == bind_plan(specs, [0, 1, 2, 3], seed=9)
    assert all(f.hits(t) for f in plan for t in f.targets)


# -- windows ---------------------------------------------------------------------------------


def _window(**spec: Any) -> ActiveFault:
    return ActiveFault(FaultSpec(kind="delay", delay_ms=1.0, **spec), [0], 0)


def test_step_window() -> None:
    f = _window(at_step=5, duration_steps=3)
    assert [s for s in range(12) if f.in_window(s, 0.0)] == [5, 6, 7]
    assert [s for s in range(12) if _window(at_step=5).in_window(s, 0.0)] == list(range(5, 12))
    assert all(_window().in_window(s, 0.0) for s in range(5))  # no trigger: always


def test_seconds_window() -> None:
    f = _window(at_s=2.0, duration_s=1.5)
    times = [0.0, 1.99, 2.0, 3.0, 3.49, 3.5, 10.0]
    assert [t for t in times if f.in_window(0, t)] == [2.0, 3.0, 3.49]
    assert [t for t in times if _window(at_s=2.0).in_window(0, t)] == [2.0, 3.0, 3.49, 3.5, 10.0]


def test_delay_follows_the_step_window() -> None:
    wf = _faults(
        0, {"kind": "delay", "workers": [0], "delay_ms": 10.0, "at_step": 2, "duration_steps": 2}
    )
    assert [wf.delay_s(s, 0.0) for s in range(6)] == [0.0, 0.0, 0.01, 0.01, 0.0, 0.0]


def test_delay_follows_the_seconds_window() -> None:
    wf = _faults(
        0, {"kind": "delay", "workers": [0], "delay_ms": 10.0, "at_s": 1.0, "duration_s": 2.0}
    )
    assert [wf.delay_s(s, t) for s, t in enumerate([0.5, 1.0, 2.9, 3.0, 9.0])] == [
        0.0,
        0.01,
        0.01,
        0.0,
        0.0,
    ]


def test_delay_window_started_by_time_and_measured_in_steps() -> None:
    """The window opens at the first step seen at or after ``at_s``, and lasts that many
    steps."""
    wf = _faults(
        0, {"kind": "delay", "workers": [0], "delay_ms": 10.0, "at_s": 1.0, "duration_steps": 2}
    )
    times = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    got = [wf.delay_s(step, t) for step, t in enumerate(times)]
    assert got == [0.0, 0.0, 0.01, 0.01, 0.0, 0.0, 0.0]


def test_delay_window_started_by_step_and_measured_in_seconds() -> None:
    """The window opens at ``at_step`` and lasts ``duration_s`` from the time it opened."""
    wf = _faults(
        0, {"kind": "delay", "workers": [0], "delay_ms": 10.0, "at_step": 2, "duration_s": 1.0}
    )
    # step 2 starts at t=5.0 s; the window closes one second later
    seq = [(0, 0.0), (1, 4.0), (2, 5.0), (3, 5.5), (4, 6.5), (5, 9.0)]
    assert [wf.delay_s(s, t) for s, t in seq] == [0.0, 0.0, 0.01, 0.01, 0.0, 0.0]
