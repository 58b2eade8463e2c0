"""Unit tests for actors/consistency.py: the bound formulas against hand computations, the
per-mode bound from frozen constants, the warm-up estimator (frozen after the warm-up: later
huge norms do not move it), and the B-hat monitor (max, mean, the verdict's window, a
bounded series that keeps spikes)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from actors.consistency import (
    ConsistencyMonitor,
    ObservedNorms,
    adam_moment_gain,
    drop_fraction,
    elastic_amplification,
    missing_term,
    missing_term_own,
    missing_term_reaverage,
    missing_term_zero_fill,
    momentum_gain,
    residual_bound,
)
from actors.modes.registry import analytic_bound
from actors.schedules import lr_ratio, schedule_factor
from actors.warmup import Constants, WarmupEstimator
from core.spec import FaultSpec, JobSpec, OptimizerSpec, parse_spec

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


def _consts(m: float = 2.0, m_raw: float = 3.0, sigma: float = 1.0) -> Constants:
    return Constants(
        m=m,
        m_raw=m_raw,
        sigma=sigma,
        smoothness=math.nan,
        warmup_steps=20,
        frozen_at_step=20,
        safety_factor=2.0,
    )


C = _consts()


def test_sync_bound_is_zero() -> None:
    assert analytic_bound(_spec({"name": "sync"}), C, 0.0, False) == 0.0


def test_straggler_bound_shrinks_with_beta_and_is_zero_at_one() -> None:
    amp = elastic_amplification(3, 0.9, 1e-4, 0.1, False)
    spec = _spec({"name": "straggler", "beta": 0.5, "max_lag": 3})
    # ((1 - beta) + 1/min_workers) M A(max_lag); min_workers 1, M = C.m
    assert analytic_bound(spec, C, 0.0, False) == pytest.approx((0.5 + 1.0) * C.m * amp)
    bounds = [
        analytic_bound(_spec({"name": "straggler", "beta": b, "max_lag": 3}), C, 0.0, False)
        for b in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    assert bounds == sorted(bounds, reverse=True) and bounds[-1] == 0.0
    wider = _spec({"name": "straggler", "beta": 0.5, "max_lag": 5})
    assert analytic_bound(wider, C, 0.0, False) > analytic_bound(spec, C, 0.0, False)


def test_elastic_bound_is_one_minus_beta_times_the_frozen_lagged_update() -> None:
    amp = elastic_amplification(2, 0.9, 1e-4, 0.1, False)
    for beta in (0.0, 0.25, 0.5, 0.75):
        spec = _spec({"name": "elastic", "beta": beta, "max_lag": 2})
        want = (1 - beta) * 2.0 * C.m * amp
        assert analytic_bound(spec, C, 0.0, False) == pytest.approx(want)
    one = _spec({"name": "elastic", "beta": 1.0, "max_lag": 2})
    assert analytic_bound(one, C, 0.0, False) == 0.0


def test_async_bound_is_tau_m_over_one_minus_momentum() -> None:
    for tau in (0, 1, 4, 16):
        spec = _spec({"name": "async", "max_staleness": tau})  # momentum 0.9
        assert analytic_bound(spec, C, 0.0, False) == pytest.approx(tau * 2.0 / 0.1)
    plain = _spec({"name": "async", "max_staleness": 4}, momentum=0.0)
    assert analytic_bound(plain, C, 0.0, False) == pytest.approx(8.0)


def test_local_bound_is_two_h_m() -> None:
    for h in (1, 4, 8):
        spec = _spec({"name": "local", "local_steps": h})
        assert analytic_bound(spec, C, 0.0, False) == pytest.approx(2.0 * h * 2.0)


def test_error_feedback_adds_the_residual_bound() -> None:
    sync = _spec({"name": "sync"})
    assert analytic_bound(sync, C, 0.5, True) == pytest.approx(residual_bound(0.5, 3.0))
    assert analytic_bound(sync, C, 0.5, False) == 0.0  # no memory, no residual
    assert analytic_bound(sync, C, 1.0, True) == math.inf
    spec = _spec({"name": "async", "max_staleness": 2}, momentum=0.0)
    assert analytic_bound(spec, C, 0.5, True) == pytest.approx(4.0 + 3.0)


def test_drop_fraction_comes_from_the_plan() -> None:
    one = FaultSpec(kind="drop", workers=[1], probability=0.2)
    two = FaultSpec(kind="drop", count=2, probability=0.2)
    everyone = FaultSpec(kind="drop", probability=0.2)
    assert drop_fraction([one], 4) == pytest.approx(0.25)
    assert drop_fraction([one, two], 4) == pytest.approx(0.75)
    assert drop_fraction([everyone], 4) == 1.0
    assert drop_fraction([[0, 3]], 8) == pytest.approx(0.25)  # resolved targets
    assert drop_fraction([], 4) == 0.0


# -- the warm-up estimator ----------------------------------------------------------------


def _feed(e: WarmupEstimator, step: int, grads: list[torch.Tensor]) -> None:
    for g in grads:
        n = float(g.norm())
        e.see_grad(step, g, n, n)


def test_estimator_measures_m_sigma_and_l_over_the_warm_up_then_freezes() -> None:
    e = WarmupEstimator(warmup_steps=2, safety_factor=2.0)
    x0, x1, x2 = torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    # step 0: gradients (3, 0) and (1, 0): mean (2, 0), spread 1 each
    _feed(e, 0, [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])])
    assert e.step_done(0, x0) is None
    # step 1: (0, 2) and (0, 2): mean (0, 2), no spread; closes step 0
    _feed(e, 1, [torch.tensor([0.0, 2.0]), torch.tensor([0.0, 2.0])])
    assert e.step_done(1, x1) is None
    c = e.step_done(2, x2)  # closes step 1 and freezes
    assert c is not None and e.frozen is c
    assert c.m == pytest.approx(2.0 * 3.0)  # safety x the largest norm
    assert c.sigma == pytest.approx(2.0 * 1.0)
    # L: ||(0,2) - (2,0)|| / ||x2 - x1|| = sqrt(8) / 1
    assert c.smoothness == pytest.approx(math.sqrt(8.0))
    assert (c.warmup_steps, c.frozen_at_step) == (2, 2)


def test_frozen_constants_do_not_follow_later_norms() -> None:
    e = WarmupEstimator(warmup_steps=1, safety_factor=1.5)
    _feed(e, 0, [torch.tensor([1.0, 0.0])])
    c = e.step_done(1, torch.zeros(2))
    assert c is not None
    # the run blows up: huge and non-finite gradients after the warm-up
    _feed(e, 1, [torch.tensor([1e20, 0.0])])
    e.see_grad(2, torch.tensor([math.inf, 0.0]), math.inf, math.inf)
    assert e.step_done(5, torch.full((2,), 1e9)) is None
    assert e.frozen is c and c.m == pytest.approx(1.5)
    spec = _spec({"name": "async", "max_staleness": 4}, momentum=0.0)
    assert analytic_bound(spec, c, 0.0, False) == pytest.approx(4 * 1.5)


def test_estimator_adds_weight_decay_and_divides_local_messages() -> None:
    e = WarmupEstimator(warmup_steps=1, safety_factor=1.0, weight_decay=0.1, per_message_steps=4)
    _feed(e, 0, [torch.tensor([8.0, 0.0])])  # a local message: the sum of 4 gradients
    c = e.step_done(1, torch.tensor([0.0, 10.0]))
    assert c is not None
    assert c.m == pytest.approx(8.0 / 4 + 0.1 * 10.0)  # per-step norm + wd ||x||


def test_estimator_restarts_its_window_from_a_step() -> None:
    e = WarmupEstimator(warmup_steps=3, safety_factor=1.0, start_step=10)
    _feed(e, 10, [torch.tensor([1.0])])
    assert e.step_done(12, torch.zeros(1)) is None
    assert e.step_done(13, torch.zeros(1)) is not None


def test_lost_gradients_add_a_cumulative_term_stated_from_the_plan() -> None:
    spec = _spec({"name": "sync"})  # momentum 0.9: gain 10; sync's own term is 0
    gain = momentum_gain(0.9)
    assert gain == pytest.approx(10.0)
    # zero_fill: the shares add up over the run, gain K f M
    b = analytic_bound(spec, C, 0.0, False, 0.25, total_steps=100)
    assert b == pytest.approx(gain * 100 * 0.25 * C.m)
    # reaverage: in quadrature, gain sqrt(2) sqrt(K f^2) sigma
    rea = spec.model_copy(update={"missing_policy": "reaverage"})
    want = gain * math.sqrt(2) * math.sqrt(100 * 0.25**2) * C.sigma
    assert analytic_bound(rea, C, 0.0, False, 0.25, total_steps=100) == pytest.approx(want)
    # own: reaverage's gap plus its view's one-step substitution sqrt(2) f sigma
    own = spec.model_copy(update={"missing_policy": "own"})
    got = analytic_bound(own, C, 0.0, False, 0.25, total_steps=100)
    assert got == pytest.approx(want + math.sqrt(2) * 0.25 * C.sigma)
    assert analytic_bound(spec, C, 0.0, False, 0.0, total_steps=100) == 0.0  # none lost


def test_adam_moment_gain_sums_the_bias_corrected_first_moment() -> None:
    # beta1 = 0: m_hat = g, a lost share enters one update whole
    assert adam_moment_gain(0.0, 100) == 1.0
    # by hand, 3 steps of beta1 0.5: 0.5/0.5 + 0.25/0.75 + 0.125/0.875
    assert adam_moment_gain(0.5, 3) == pytest.approx(1.0 + 1 / 3 + 1 / 7)
    # more than 1 (bias correction amplifies the first steps), grows with the steps,
    # and converges (the weights decay geometrically)
    g = [adam_moment_gain(0.9, k) for k in (1, 10, 100, 1000, 100_000)]
    assert g[0] == pytest.approx(1.0) and g == sorted(g) and g[-1] - g[-2] < 1e-9
    assert 2.9 < g[-1] < 3.1


def test_lost_gradients_under_adam_are_written_in_preconditioned_constants() -> None:
    spec = parse_spec(
        {"steps": 100, "mode": {"name": "sync"}, "optimizer": {"name": "adamw", "lr": 0.01}}
    )
    c = Constants(**{**C.__dict__, "m_p": 40.0, "sigma_p": 7.0, "u": 1.5})
    gain = adam_moment_gain(0.9, 100)
    # zero_fill: gain K f M_P, not SGD's (1/(1-mu)) K f M
    b = analytic_bound(spec, c, 0.0, False, 0.25, total_steps=100)
    assert b == pytest.approx(gain * 100 * 0.25 * 40.0)
    rea = spec.model_copy(update={"missing_policy": "reaverage"})
    want = gain * math.sqrt(2) * math.sqrt(100 * 0.25**2) * 7.0
    assert analytic_bound(rea, c, 0.0, False, 0.25, total_steps=100) == pytest.approx(want)
    # never measured (a checkpoint from before M_P existed): no finite bound, not SGD's
    assert math.isnan(analytic_bound(spec, C, 0.0, False, 0.25, total_steps=100))
    # error feedback keeps gradient units: the consistent model is x - lr mean(e)
    ef = analytic_bound(spec, c, 0.5, True, 0.0, total_steps=100)
    assert ef == pytest.approx(residual_bound(0.5, C.m_raw))


def test_estimator_measures_the_preconditioned_gradients_too() -> None:
    e = WarmupEstimator(warmup_steps=1, safety_factor=2.0)
    g1, g2 = torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])
    p1, p2 = torch.tensor([0.0, 4.0]), torch.tensor([0.0, 2.0])  # P g, as Adam would give
    for g, p in ((g1, p1), (g2, p2)):
        e.see_grad(0, g, float(g.norm()), float(g.norm()), p)
    c = e.step_done(1, torch.zeros(2))
    assert c is not None
    assert c.m_p == pytest.approx(2.0 * 4.0)  # safety x max ||P g||
    assert c.sigma_p == pytest.approx(2.0 * 1.0)  # spread of (0,4), (0,2) around (0,3)
    assert c.m == pytest.approx(2.0 * 3.0) and c.public()["M_P"] == c.m_p
    # SGD: nothing preconditioned, nothing stated
    e2 = WarmupEstimator(warmup_steps=1, safety_factor=2.0)
    _feed(e2, 0, [g1])
    c2 = e2.step_done(1, torch.zeros(2))
    assert c2 is not None and math.isnan(c2.m_p) and c2.public()["M_P"] is None


def test_lr_ratio_is_how_much_larger_an_earlier_lr_can_be() -> None:
    const = OptimizerSpec(name="sgd", lr=0.1)
    assert lr_ratio(const, 1000, None) == 1.0 and lr_ratio(const, 1000, 4) == 1.0
    # StepLR halving every 10 steps over 40: the first lr is 8x the last; 2 steps back
    # reach across at most one halving
    step = OptimizerSpec(
        name="sgd", lr=0.1, schedule={"name": "step", "step_size": 10, "gamma": 0.5}
    )
    assert lr_ratio(step, 40, None) == pytest.approx(8.0)
    assert lr_ratio(step, 40, 2) == pytest.approx(2.0)
    assert lr_ratio(step, 40, 0) == 1.0
    # warm-up only raises the lr (ratio 1 there); the cosine's end sets it: peak / last
    cos = OptimizerSpec(
        name="adamw",
        lr=0.01,
        schedule={"name": "warmup_cosine", "warmup_steps": 10, "min_lr_ratio": 0.1},
    )
    assert lr_ratio(cos, 120, None) == pytest.approx(1.0 / schedule_factor(cos, 119, 120))
    assert 1.0 < lr_ratio(cos, 120, 2) < lr_ratio(cos, 120, 5) < lr_ratio(cos, 120, None)


def test_a_decaying_lr_scales_the_bound() -> None:
    # B̂ divides by the current lr: with StepLR (8x over the run) the lost gradients'
    # cumulative term is 8x, the elastic term (max_lag 2: 3 steps back) 2x
    sched = {"schedule": {"name": "step", "step_size": 10, "gamma": 0.5}}
    flat = _spec({"name": "sync"})
    decay = _spec({"name": "sync"}, **sched)
    lost = analytic_bound(flat, C, 0.0, False, 0.25, total_steps=40)
    assert analytic_bound(decay, C, 0.0, False, 0.25, total_steps=40) == pytest.approx(8 * lost)
    el = {"name": "elastic", "beta": 0.5, "max_lag": 2}
    own = analytic_bound(_spec(el), C, 0.0, False, 0.0, total_steps=40)
    got = analytic_bound(_spec(el, **sched), C, 0.0, False, 0.0, total_steps=40)
    assert got == pytest.approx(2.0 * own)


def test_momentum_gain_sums_the_momentum_series() -> None:
    assert momentum_gain(0.0) == 1.0
    assert momentum_gain(0.5) == pytest.approx(2.0)


def test_missing_terms_per_policy() -> None:
    # zero_fill misses the whole lost share (f M); reaverage and own only its noise
    assert missing_term_zero_fill(0.2, 3.0) == pytest.approx(0.6)
    assert missing_term_reaverage(0.2, 0.5) == pytest.approx(math.sqrt(2) * 0.1)
    assert missing_term_own(0.2, 0.5) == pytest.approx(math.sqrt(2) * 0.1)
    assert missing_term("zero_fill", 0.2, 3.0, 0.5) == missing_term_zero_fill(0.2, 3.0)
    assert missing_term("own", 0.2, 3.0, 0.5) == missing_term_own(0.2, 0.5)
    assert missing_term("reaverage", 0.0, 3.0, 0.5) == 0.0  # nothing lost, nothing missing


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
    assert s["ratio"] == pytest.approx(0.2)  # the mean's: the verdict's quantity
    assert s["views_measured"] == 5
    assert m.summary(None)["bound"] is None and m.summary(None)["ratio"] is None


def test_monitor_window_mean_is_over_the_last_samples() -> None:
    m = ConsistencyMonitor(window=3)
    assert m.window_mean is None and not m.window_full
    for step, b in enumerate([100.0, 1.0, 2.0, 3.0]):
        m.record(step, b)
    assert m.window_full and m.window_mean == pytest.approx(2.0)  # 100 has left the window
    m.reset_window()
    assert m.window_mean is None and not m.window_full
    assert m.b_max == 100.0  # the run's statistics stay


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
