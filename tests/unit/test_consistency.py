"""Unit tests for actors/consistency.py: the bound formulas against hand computations, the
per-mode analytic bound, and the B-hat monitor (max, mean, a bounded series that keeps
spikes)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from actors.consistency import (
    ConsistencyMonitor,
    ObservedNorms,
    analytic_bound,
    elastic_amplification,
    residual_bound,
)
from core.spec import JobSpec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


# -- elastic_amplification ----------------------------------------------------------------


def test_amplification_without_momentum_is_the_lag() -> None:
    for lag in range(6):
        assert elastic_amplification(lag, 0.0, 0.0, 0.1, False) == pytest.approx(lag)


def test_amplification_with_momentum_by_hand() -> None:
    # mu = 0.9, no weight decay:
    #   m=1: b = 1,              e = 1
    #   m=2: b = 0.9 + 1 = 1.9,  e = 1 + 1.9 = 2.9
    #   m=3: b = 1.71 + 1 = 2.71, e = 2.9 + 2.71 = 5.61
    assert elastic_amplification(1, 0.9, 0.0, 0.1, False) == pytest.approx(1.0)
    assert elastic_amplification(2, 0.9, 0.0, 0.1, False) == pytest.approx(2.9)
    assert elastic_amplification(3, 0.9, 0.0, 0.1, False) == pytest.approx(5.61)


def test_amplification_nesterov_by_hand() -> None:
    # d_m = (1 + mu) b_m with mu = 0.5:
    #   m=1: b = 1,   e = 1.5
    #   m=2: b = 1.5, e = 1.5 + 2.25 = 3.75
    assert elastic_amplification(1, 0.5, 0.0, 0.1, True) == pytest.approx(1.5)
    assert elastic_amplification(2, 0.5, 0.0, 0.1, True) == pytest.approx(3.75)


def test_amplification_weight_decay_by_hand() -> None:
    # mu = 0, wd * lr = 0.1 * 0.5 = 0.05:
    #   m=1: b = 1,                 e = 1
    #   m=2: b = 1 + 0.05 * 1 = 1.05, e = 2.05
    #   m=3: b = 1 + 0.05 * 2.05 = 1.1025, e = 3.1525
    assert elastic_amplification(3, 0.0, 0.1, 0.5, False) == pytest.approx(3.1525)
    # mu = 0.9 and wd: m=2: b = 0.9 + 1 + 0.05 = 1.95, e = 2.95
    assert elastic_amplification(2, 0.9, 0.1, 0.5, False) == pytest.approx(2.95)


def test_amplification_grows_with_lag_and_momentum() -> None:
    values = [elastic_amplification(k, 0.9, 1e-4, 0.1, False) for k in range(1, 8)]
    assert values == sorted(values)
    assert elastic_amplification(4, 0.9, 0.0, 0.1, False) > elastic_amplification(
        4, 0.5, 0.0, 0.1, False
    )


# -- residual_bound -----------------------------------------------------------------------


def test_residual_bound_edge_cases() -> None:
    assert residual_bound(0.0, 5.0) == 0.0  # no compression error, no residual
    assert residual_bound(-0.1, 5.0) == 0.0
    assert residual_bound(1.0, 5.0) == math.inf  # not a contraction: unbounded
    assert residual_bound(1.5, 5.0) == math.inf
    assert residual_bound(0.5, 5.0) == pytest.approx(5.0)  # q/(1-q) = 1
    assert residual_bound(0.9, 2.0) == pytest.approx(18.0)  # 9 x 2
    assert residual_bound(0.5, 0.0) == 0.0


# -- analytic_bound per mode --------------------------------------------------------------


def _spec(mode: dict[str, Any], **opt: Any) -> JobSpec:
    optimizer = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, **opt}
    return parse_spec({"steps": 10, "mode": mode, "optimizer": optimizer})


NORMS = ObservedNorms(grad_max=2.0, raw_grad_max=3.0, update_max=5.0)


def test_sync_bound_is_zero() -> None:
    assert analytic_bound(_spec({"name": "sync"}), NORMS, 0.0, False) == 0.0


def test_straggler_bound_shrinks_with_beta_and_is_zero_at_one() -> None:
    amp = elastic_amplification(3, 0.9, 1e-4, 0.1, False)
    spec = _spec({"name": "straggler", "beta": 0.5, "max_lag": 3})
    # ((1 - beta) + 1/min_workers) G A(max_lag); min_workers 1, G 2
    assert analytic_bound(spec, NORMS, 0.0, False) == pytest.approx((0.5 + 1.0) * 2.0 * amp)
    bounds = [
        analytic_bound(_spec({"name": "straggler", "beta": b, "max_lag": 3}), NORMS, 0.0, False)
        for b in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    assert bounds == sorted(bounds, reverse=True) and bounds[-1] == 0.0
    wider = _spec({"name": "straggler", "beta": 0.5, "max_lag": 5})
    assert analytic_bound(wider, NORMS, 0.0, False) > analytic_bound(spec, NORMS, 0.0, False)


def test_elastic_bound_is_one_minus_beta_times_max_lag_times_the_update_block_sum() -> None:
    norms = ObservedNorms(grad_max=2.0, update_block_sum_max=3.0)
    for beta in (0.0, 0.25, 0.5, 0.75):
        spec = _spec({"name": "elastic", "beta": beta, "max_lag": 2})
        assert analytic_bound(spec, norms, 0.0, False) == pytest.approx((1 - beta) * 2 * 3.0)
    one = _spec({"name": "elastic", "beta": 1.0, "max_lag": 2})
    assert analytic_bound(one, norms, 0.0, False) == 0.0


def test_async_bound_is_tau_times_the_largest_update() -> None:
    for tau in (0, 1, 4, 16):
        spec = _spec({"name": "async", "max_staleness": tau})
        assert analytic_bound(spec, NORMS, 0.0, False) == pytest.approx(tau * 5.0)


def test_error_feedback_adds_the_residual_bound() -> None:
    sync = _spec({"name": "sync"})
    assert analytic_bound(sync, NORMS, 0.5, True) == pytest.approx(residual_bound(0.5, 3.0))
    assert analytic_bound(sync, NORMS, 0.5, False) == 0.0  # no memory, no residual
    assert analytic_bound(sync, NORMS, 1.0, True) == math.inf
    spec = _spec({"name": "async", "max_staleness": 2})
    assert analytic_bound(spec, NORMS, 0.5, True) == pytest.approx(10.0 + 3.0)


def test_lost_gradients_add_a_one_step_term() -> None:
    norms = ObservedNorms(grad_max=2.0, raw_grad_max=3.0, update_max=5.0, lost_fraction_max=0.25)
    spec = _spec({"name": "sync"})
    amp1 = elastic_amplification(1, 0.9, 1e-4, 0.1, False)
    # skip: f * G; substitute: 2 f G (mean of the arrived minus mean of the lost)
    assert analytic_bound(spec, norms, 0.0, False) == pytest.approx(0.25 * 2.0 * amp1)
    sub = spec.model_copy(update={"missing_policy": "substitute"})
    assert analytic_bound(sub, norms, 0.0, False) == pytest.approx(0.25 * 2.0 * 2.0 * amp1)


def test_observed_norms_keep_running_maxima() -> None:
    n = ObservedNorms()
    for sent, raw in [(1.0, 2.0), (3.0, 1.0), (0.5, 0.5)]:
        n.see_grad(sent, raw)
    n.see_update(4.0)
    n.see_update(1.0)
    assert (n.grad_max, n.raw_grad_max, n.update_max) == (3.0, 2.0, 4.0)


# -- ConsistencyMonitor -------------------------------------------------------------------


def test_monitor_max_and_mean() -> None:
    m = ConsistencyMonitor()
    assert m.b_mean == 0.0
    for step, b in enumerate([0.0, 2.0, 1.0, 5.0, 2.0]):
        m.record(step, b)
    assert m.b_max == 5.0
    assert m.b_mean == pytest.approx(2.0)
    assert m.series == [(0, 0.0), (1, 2.0), (2, 1.0), (3, 5.0), (4, 2.0)]
    s = m.summary(bound=10.0)
    assert s["b_hat_max"] == 5.0 and s["b_hat_mean"] == pytest.approx(2.0)
    assert s["bound"] == 10.0 and s["b_hat_over_bound"] == pytest.approx(0.5)
    assert s["views_measured"] == 5


def test_monitor_summary_with_zero_or_infinite_bound() -> None:
    m = ConsistencyMonitor()
    m.record(0, 0.0)
    s = m.summary(0.0)
    assert s["bound"] == 0.0 and s["b_hat_over_bound"] == 0.0  # sync: 0 / 0 reads as 0
    s = m.summary(math.inf)
    assert s["bound"] is None  # JSON has no infinity
    m.record(1, 1.0)
    assert m.summary(math.inf)["b_hat_over_bound"] is None
    assert m.summary(0.0)["b_hat_over_bound"] is None  # B-hat > 0 = bound: no ratio


def test_monitor_series_is_bounded_and_keeps_spikes() -> None:
    m = ConsistencyMonitor(max_points=64)
    n = 10_000
    spikes = {1234: 50.0, 7777: 80.0, 9000: 60.0}
    for step in range(n):
        m.record(step, spikes.get(step, 1.0 + (step % 7) * 0.01))
    assert len(m.series) <= 64
    values = [b for _, b in m.series]
    for step, b in spikes.items():
        assert b in values, f"spike at step {step} lost"
        # the spike is reported near where it happened
        at = [s for s, v in m.series if v == b]
        assert at and abs(at[0] - step) <= 2 * n // 64
    assert m.b_max == 80.0
    assert m.count == n
    steps = [s for s, _ in m.series]
    assert steps == sorted(steps)
    # the series still spans the run
    assert steps[-1] >= n - 2 * n // 64


def test_monitor_series_shows_a_spike_in_the_newest_window() -> None:
    """Once the series has been halved, samples wait in an open window until ``stride`` of
    them arrived; a spike in that window must show in the series too (a run can end with
    it there)."""
    m = ConsistencyMonitor(max_points=8)
    for step in range(100):
        m.record(step, 1.0)
    m.record(100, 9.0)
    assert max(b for _, b in m.series) == 9.0
