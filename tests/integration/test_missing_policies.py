"""Integration: the missing-gradient policies on local Ray, a cheap version of
``bench/missing_policies.py``.

The drop drill's job (digits, 4 workers, sync mode, every gradient message lost with
probability 0.2) at batch 32 for 100 steps, under ``zero_fill`` and ``own`` with the same
seeds (as many messages lost at the same steps), plus one step at which every worker's message is
lost. Checks: ``own``'s mean B̂ (cumulative, against the consistent sequence) is below
``zero_fill``'s, averaged over 2 seeds; the all-lost step is recorded (a step record with
no loss, a ``missing`` event) and counted in the summary; every drop is an event.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
from integration_helpers import records, run_many

from bench.missing_policies import job
from core.spec import parse_spec

pytestmark = pytest.mark.integration

SEEDS = (0, 1)
STEPS = 100
BATCH = 32
ALL_LOST_STEP = 7  # every worker's message of this step is lost (an extra drop fault)


def _spec(policy: str, seed: int) -> Any:
    data = job(policy, BATCH, seed, STEPS)
    data["faults"] = [*data["faults"], {"kind": "drop", "steps": [ALL_LOST_STEP]}]
    return parse_spec(data)


@pytest.mark.timeout(900)
def test_own_gives_a_smaller_mean_b_hat_than_zero_fill(tmp_path: Path) -> None:
    b_hat: dict[str, list[float]] = {"zero_fill": [], "own": []}
    for seed in SEEDS:  # two jobs at a time: 2 x 1.25 CPUs fit the session's 4
        jobs = [(_spec(p, seed), tmp_path / f"{p}-{seed}") for p in b_hat]
        for (spec, out), summary in zip(jobs, run_many(jobs), strict=True):
            assert summary["state"] == "succeeded", summary["error"]
            cons = summary["consistency"]
            assert cons["views_measured"] > 0
            b_hat[spec.missing_policy].append(cons["b_hat_mean"])
            _check_all_lost_step(summary, records(out))
    means = {p: statistics.fmean(v) for p, v in b_hat.items()}
    assert 0.0 < means["own"] < means["zero_fill"], b_hat


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
