"""Integration: B̂ of an AdamW job in the per-block elastic mode, against its stated bound.

For adaptive optimizers B̂ is measured in update units (``||x - v|| / lr`` with ``lr`` the
step's base lr: Adam's update divided by its lr is ``m_hat / (sqrt(v_hat) + eps)`` plus the
decoupled weight decay), and the bound is written in ``U``, the warm-up's largest update
in those units (docs/consistency.md, "Adaptive optimizers"): ``(1 - beta) * 2 * max_lag *
U`` for elastic. A real run on digits (4 workers, beta 0.5, max_lag 2, AdamW with warm-up
and cosine) must measure a non-zero B̂ whose mean stays within that bound, with ``U``
stated and below Adam's worst case per coordinate times sqrt(d).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from integration_helpers import config, run_job

from actors.consistency import adam_coordinate_bound

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
    assert bound == pytest.approx((1 - 0.5) * 2 * 2 * u, rel=1e-6)
    # U (warm-up max x safety) is far inside Adam's worst case: every coordinate at the
    # per-coordinate bound, sqrt(d) of them (plus weight decay's share)
    d = s["parameters"]
    assert u < adam_coordinate_bound(0.9, 0.999, STEPS) * math.sqrt(d) * spec.guard.safety_factor
