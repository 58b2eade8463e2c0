"""Integration: the missing-gradient policies on local Ray, a cheap version of
``bench/missing_policies.py``.

The drop drill's job (digits, 4 workers, sync mode, every gradient message lost with
probability 0.2) at batch 32 for 100 steps, under ``zero_fill`` and ``own`` with the same
seed (as many messages lost at the same steps), plus one step at which every worker's message
is lost. Checks: ``own``'s mean B̂ (cumulative, against the consistent sequence) is below
``zero_fill``'s; the all-lost step is recorded (a step record with no loss, a ``missing``
event) and counted in the summary; every drop is an event.

One seed, 1: the drill test (``test_drills.py``, ``drop_20pct`` under both policies) makes
the same comparison on seed 0 over 300 steps, so the two seeds are each checked on their
own (``bench/missing_policies.py`` measured own below zero_fill in 5 of 5 seeds, by about
half). Two jobs, started together: their actors' start-up is the cost, not their steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from integration_helpers import records, run_many

from bench.missing_policies import job
from core.spec import parse_spec

pytestmark = pytest.mark.integration

SEED = 1  # seed 0 is the drill test's
STEPS = 100
BATCH = 32
ALL_LOST_STEP = 7  # every worker's message of this step is lost (an extra drop fault)


def _spec(policy: str, seed: int) -> Any:
    data = job(policy, BATCH, seed, STEPS)
    data["faults"] = [*data["faults"], {"kind": "drop", "steps": [ALL_LOST_STEP]}]
    return parse_spec(data)


@pytest.mark.timeout(900)
def test_own_gives_a_smaller_mean_b_hat_than_zero_fill(tmp_path: Path) -> None:
    b_hat: dict[str, float] = {}
    # both jobs at once: 2 x 1.25 CPUs fit the session's 4
    jobs = [(_spec(p, SEED), tmp_path / p) for p in ("zero_fill", "own")]
    for (spec, out), summary in zip(jobs, run_many(jobs), strict=True):
        assert summary["state"] == "succeeded", summary["error"]
        cons = summary["consistency"]
        assert cons["views_measured"] > 0
        b_hat[spec.missing_policy] = cons["b_hat_mean"]
        _check_all_lost_step(summary, records(out))
    assert 0.0 < b_hat["own"] < b_hat["zero_fill"], b_hat


def _check_all_lost_step(summary: dict[str, Any], recs: list[dict[str, Any]]) -> None:
    assert summary["steps_all_lost"] >= 1
    events = [e for e in summary["events"] if e["kind"] == "missing"]
    said = [e for e in events if "every gradient lost" in e["detail"]]
    assert len(said) == summary["steps_all_lost"]
    assert any(e["detail"].startswith(f"step {ALL_LOST_STEP}:") for e in said), said
    # one record per step, the all-lost ones without a loss
    steps = [r for r in recs if r["kind"] == "step"]
    assert len(steps) == STEPS
    assert sum(r["loss"] is None for r in steps) == summary["steps_all_lost"]
    # every dropped message is a drop event and a missing-gradient event
    drops = [e for e in summary["events"] if e["kind"] == "fault" and e.get("fault") == "drop"]
    assert len(drops) == summary["dropped_gradients"]
    assert len([e for e in events if e.get("fault") == "drop"]) == summary["dropped_gradients"]
