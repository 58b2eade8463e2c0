"""Integration: a checkpointed AdamW job resumed after its coordinator died continues
exactly as the uninterrupted run.

Two sync jobs with AdamW + linear warm-up / cosine + clipping, the same seed and samples:
one runs straight through, the other's coordinator process is killed at step 14 (a
``coordinator_crash`` fault); Ray restarts it, it loads the checkpoint of step 10 (the
model of record, AdamW's moments and step counts, the scheduler's position, the workers'
samplers) and does steps 10-13 again. Both must end at the same parameters: a lost or
reset moment, or a schedule that restarted its warm-up, would show far above the float
tolerance (the test checks that a resume from fresh optimizer state does differ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from integration_helpers import config, final_params, run_many

from actors.optim import RecordOptimizer
from core.spec import JobSpec, OptimizerSpec

pytestmark = pytest.mark.integration

STEPS = 24
ATOL = 1e-6
ADAMW: dict[str, Any] = {
    "name": "adamw",
    "lr": 0.01,
    "weight_decay": 0.05,
    "momentum": 0.0,  # the base config's SGD momentum, merged in: off
    "schedule": {"name": "warmup_cosine", "warmup_steps": 12, "min_lr_ratio": 0.1},
    "clip_grad_norm": 1.0,
    "no_decay_bias_and_norm": True,
}


def _spec(crash: bool) -> JobSpec:
    faults = [{"kind": "coordinator_crash", "at_step": 14}] if crash else []
    return config(
        "digits_sync.yaml",
        name=f"resume-exact-{'crash' if crash else 'straight'}",
        workers=2,
        steps=STEPS,
        batch_size=16,
        eval_interval=STEPS,
        optimizer=ADAMW,
        # step 10's checkpoint is the one the restarted coordinator loads
        checkpoint={"interval_steps": 10, "interval_s": None},
        max_coordinator_restarts=2,
        faults=faults,
    )


@pytest.mark.timeout(600)
def test_adamw_job_resumed_from_a_checkpoint_continues_exactly(tmp_path: Path) -> None:
    jobs = [(_spec(False), tmp_path / "straight"), (_spec(True), tmp_path / "crash")]
    straight, crashed = run_many(jobs)
    assert straight["state"] == "succeeded", straight.get("error")
    assert crashed["state"] == "succeeded", crashed.get("error")
    assert crashed["steps"] == straight["steps"] == STEPS
    assert crashed["steps_lost"] == 4, crashed["steps_lost"]  # steps 10-13 done again
    want, got = final_params(tmp_path / "straight"), final_params(tmp_path / "crash")
    err = float((got - want).abs().max())
    assert err <= ATOL, f"max |diff| {err:.3g} > {ATOL}"


def test_fresh_optimizer_state_would_not_pass() -> None:
    """The check can fail: dropping AdamW's state and the schedule at step 10 moves the
    end point far past ATOL (the same data and model otherwise)."""
    spec = OptimizerSpec(**ADAMW)
    torch.manual_seed(0)
    grads = [torch.randn(50) for _ in range(STEPS)]
    kept = RecordOptimizer(spec, torch.zeros(50), None, STEPS)
    fresh = RecordOptimizer(spec, torch.zeros(50), None, STEPS)
    for k, g in enumerate(grads):
        if k == 10:
            x = fresh.x.clone()
            fresh = RecordOptimizer(spec, x, None, STEPS)
        kept.step(g)
        fresh.step(g)
    assert float((kept.x - fresh.x).abs().max()) > 1000 * ATOL
