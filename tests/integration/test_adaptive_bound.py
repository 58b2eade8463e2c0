"""Integration: B̂ of AdamW jobs against their stated bounds.

The per-block elastic mode:

For adaptive optimizers B̂ is measured in update units (``||x - v|| / lr`` with ``lr`` the
step's base lr: Adam's update divided by its lr is ``m_hat / (sqrt(v_hat) + eps)`` plus the
decoupled weight decay), and the bound is written in ``U``, the warm-up's largest update
in those units (docs/consistency.md, "Adaptive optimizers"): ``(1 - beta) * 2 * max_lag *
U`` for elastic, times the schedule's lr ratio (``lr_ratio``). A real run on digits (4
workers, beta 0.5, max_lag 2, AdamW with warm-up and cosine) must measure a non-zero B̂
whose mean stays within that bound, with ``U`` stated and below Adam's worst case per
coordinate times sqrt(d).

Lost gradients (sync, worker 0's message always lost, ``zero_fill``): the bound is written
in ``M_P``, the warm-up's preconditioned gradient norm, times the first moment's gain
(docs/consistency.md, "Missing gradients under Adam"). Two runs at once, constant lr and
warm-up + cosine to 0.1% of it:

* constant lr: the measured mean B̂ is within the stated bound, and *above* the SGD-form
  term the bound had before (``K f M`` in gradient units): that statement fails under Adam;
* cosine: B̂ divides the accumulated gap by the current, decayed lr, so the last steps'
  B̂ is far above the constant-lr run's. The bound multiplies the cumulative term by the
  schedule's largest earlier-to-current lr ratio (``lr_ratio``); the measured window mean
  is within it and above the bound without that factor, which it would have broken;
* reaverage (under Adam the same trajectory as zero_fill with a constant lost share): the
  honest run is within its sqrt(K) bound; with worker 0's lost gradients turned against
  the others after the warm-up the pieces add up along one direction, and the guard fails
  the job out of bound (the check can fail).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from integration_helpers import SMALL, config, guard_events, run_job, run_many

from actors.consistency import adam_coordinate_bound, adam_moment_gain
from actors.schedules import lr_ratio
from core.spec import JobSpec

pytestmark = pytest.mark.integration

STEPS = 80


@pytest.mark.timeout(600)
def test_adamw_elastic_b_hat_within_its_bound(tmp_path: Path) -> None:
    spec = config(
        "digits_elastic.yaml",
        name="adamw-elastic-bound",
        steps=STEPS,
        eval_interval=STEPS,
        mode={"name": "elastic", "beta": 0.5, "max_lag": 2},
        optimizer={
            "name": "adamw",
            "lr": 0.005,
            "momentum": 0.0,  # the base config's SGD momentum, merged in: off
            "weight_decay": 0.01,
            "schedule": {"name": "warmup_cosine", "warmup_steps": 10},
        },
    )
    s = run_job(spec, tmp_path)
    assert s["state"] == "succeeded", s.get("error")
    cons = s["consistency"]
    assert cons["views_measured"] > 0
    assert cons["b_hat_mean"] > 0.0, cons  # the rule let workers run ahead: B̂ is not 0
    bound = cons["bound"]
    assert bound is not None and math.isfinite(bound) and bound > 0.0, cons
    assert cons["b_hat_mean"] <= bound, cons
    u = cons["constants"]["U"]
    assert u is not None and u > 0.0
    # times the cosine's lr ratio over max_lag + 1 steps back (B̂ divides by the next lr)
    ratio = lr_ratio(spec.optimizer, STEPS, 2 + 1)
    assert ratio > 1.0
    assert bound == pytest.approx((1 - 0.5) * 2 * 2 * u * ratio, rel=1e-6)
    # U (warm-up max x safety) is far inside Adam's worst case: every coordinate at the
    # per-coordinate bound, sqrt(d) of them (plus weight decay's share)
    d = s["parameters"]
    assert u < adam_coordinate_bound(0.9, 0.999, STEPS) * math.sqrt(d) * spec.guard.safety_factor


DROP_STEPS = 120
LOST_SHARE = 0.25  # worker 0 of 4, every step: the plan's f, and the share really lost
# SMALL: four jobs at once on the session's 4 CPUs (0.6 each)
# From step 30 (10 steps after the warm-up froze the constants) worker 0's lost gradients
# point against the others': flipped and x100. Its messages are still all lost, so the
# model of record never sees them; x* applies them. The reaverage bound rests on each
# missing share having mean zero given the past, so the pieces add in quadrature
# (sqrt(K)); these add up along one direction (K), and the gap leaves the bound.
TURNED = {
    "kind": "corrupt",
    "workers": [0],
    "corruption": "scale",
    "scale_factor": -100.0,
    "at_step": 30,
    "duration_steps": DROP_STEPS,
}


def _dropping(
    name: str,
    schedule: dict[str, object],
    policy: str = "zero_fill",
    turned: bool = False,
    guard: dict[str, object] | None = None,
) -> JobSpec:
    faults: list[dict[str, object]] = [{"kind": "drop", "workers": [0], "probability": 1.0}]
    return config(
        "digits_sync.yaml",
        name=name,
        steps=DROP_STEPS,
        eval_interval=DROP_STEPS,
        seed=1,
        checkpoint={"interval_steps": None, "interval_s": None},
        missing_policy=policy,
        optimizer={
            "name": "adamw",
            "lr": 0.003,
            "momentum": 0.0,
            "weight_decay": 0.01,
            "schedule": schedule,
        },
        resources=SMALL,
        faults=[*faults, TURNED] if turned else faults,
        guard=guard or {},
    )


Drops = dict[str, tuple[JobSpec, dict[str, Any]]]


@pytest.fixture(scope="module")
def drops(tmp_path_factory: pytest.TempPathFactory) -> Drops:
    constant = {"name": "constant"}
    specs = {
        "flat": _dropping("adamw-drops-constant", constant),
        "cosine": _dropping(
            "adamw-drops-cosine",
            {"name": "warmup_cosine", "warmup_steps": 10, "min_lr_ratio": 0.001},
        ),
        "reaverage": _dropping("adamw-drops-reaverage", constant, "reaverage"),
        "turned": _dropping(
            "adamw-drops-turned", constant, "reaverage", True, {"on_out_of_bound": "fail"}
        ),
    }
    root = tmp_path_factory.mktemp("drops")
    summaries = run_many([(spec, root / key) for key, spec in specs.items()])
    return {key: (spec, s) for (key, spec), s in zip(specs.items(), summaries, strict=True)}


@pytest.mark.timeout(600)
def test_lost_gradients_under_adamw_stay_within_the_preconditioned_bound(drops: Drops) -> None:
    (_, s_flat), (cosine, s_cos) = drops["flat"], drops["cosine"]
    for s in (s_flat, s_cos):
        assert s["state"] == "succeeded", s.get("error")
        assert s["dropped_gradients"] == DROP_STEPS, s["dropped_gradients"]
        assert s["final_test_accuracy"] >= 0.9, s["final_test_accuracy"]
    gain = adam_moment_gain(0.9, DROP_STEPS)
    # constant lr: g_A K f M_P, and the mean B̂ inside it
    c = s_flat["consistency"]
    consts = c["constants"]
    assert consts["M_P"] is not None and consts["sigma_P"] is not None, consts
    stated = gain * DROP_STEPS * LOST_SHARE * consts["M_P"]
    assert c["bound"] == pytest.approx(stated, rel=1e-6), (c["bound"], stated)
    assert 0.0 < c["b_hat_mean"] <= c["bound"], c
    assert c["verdict"] == "within", c
    # the SGD form (K f M, gradient units, no gain) is below what Adam's run measured
    sgd_form = DROP_STEPS * LOST_SHARE * consts["M"]
    assert c["b_hat_mean"] > sgd_form, (c["b_hat_mean"], sgd_form)
    # cosine: within the bound that carries the lr ratio, above the one that does not
    c = s_cos["consistency"]
    ratio = lr_ratio(cosine.optimizer, DROP_STEPS, None)
    assert ratio > 100.0, ratio
    window = c["b_hat_window_mean"]
    assert window is not None and window <= c["bound"], c
    assert c["verdict"] == "within", c
    assert window > c["bound"] / ratio, (window, c["bound"] / ratio)
    print(
        f"constant lr: mean B-hat {s_flat['consistency']['b_hat_mean']:.4g}, bound "
        f"{s_flat['consistency']['bound']:.4g}, SGD form {sgd_form:.4g}; cosine: window mean "
        f"{window:.4g}, bound {c['bound']:.4g}, without the lr ratio {c['bound'] / ratio:.4g}"
    )


def _reaverage_bound(s: dict[str, Any]) -> float:
    """g_A sqrt(2 K f^2) sigma_P: the reaverage term under Adam, from the run's constants."""
    sigma_p = s["consistency"]["constants"]["sigma_P"]
    assert sigma_p is not None
    f2 = DROP_STEPS * LOST_SHARE**2
    return adam_moment_gain(0.9, DROP_STEPS) * math.sqrt(2 * f2) * sigma_p


@pytest.mark.timeout(600)
def test_a_lost_gradient_turned_against_the_others_leaves_the_reaverage_bound(
    drops: Drops,
) -> None:
    # the control: the same job with honest lost gradients is within its sqrt(K) bound
    _, honest = drops["reaverage"]
    c = honest["consistency"]
    assert honest["state"] == "succeeded", honest.get("error")
    assert c["bound"] == pytest.approx(_reaverage_bound(honest), rel=1e-6)
    assert 0.0 < c["b_hat_mean"] <= c["bound"] and c["verdict"] == "within", c
    # Adam undoes zero_fill's constant 1 - f scale: the two policies make one trajectory
    zero_fill = drops["flat"][1]["consistency"]["b_hat_mean"]
    assert c["b_hat_mean"] == pytest.approx(zero_fill, rel=1e-3), (c["b_hat_mean"], zero_fill)
    # turned against the others after the warm-up: out of bound, and the guard fails it
    spec, turned = drops["turned"]
    c = turned["consistency"]
    assert c["bound"] == pytest.approx(_reaverage_bound(turned), rel=1e-6)
    assert turned["state"] == "failed" and turned["steps"] < spec.steps, turned["steps"]
    assert turned["error"].startswith("out of bound"), turned["error"]
    assert c["verdict"] == "out_of_bound", c
    (event,) = guard_events(turned, "fail")
    assert turned["error"] in event["detail"], event
    assert event["step"] > TURNED["at_step"], event  # not in the warm-up, nor before the push
    print(
        f"reaverage: honest mean B-hat {honest['consistency']['b_hat_mean']:.4g} "
        f"<= {honest['consistency']['bound']:.4g}; turned: {turned['error']} (step "
        f"{event['step']})"
    )
