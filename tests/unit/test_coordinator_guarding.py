"""Unit tests for actors/coordinator/guarding.py (no Ray): the bound is stated once the
warm-up ends (a ``bound`` event, ``None`` before), does not follow later norms, is stated
again when the guard tightens the mode, and survives a checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from actors.checkpoint import latest_valid
from actors.consistency import ConsistencyMonitor, Meter, ObservedNorms
from actors.coordinator.guarding import Guarding
from actors.coordinator.recovery import CheckpointState, Recovery
from actors.coordinator.reporting import Reporter
from actors.guard import Action, Condition
from actors.messages import GradientReply
from actors.modes.base import ModeContext, ModelOfRecord
from actors.modes.registry import make_mode
from actors.optim import RecordOptimizer
from core.events import EventKind
from core.spec import JobSpec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _spec(**guard: object) -> JobSpec:
    return parse_spec(
        {
            "steps": 100,
            "workers": 2,
            "optimizer": {"lr": 0.1},  # no momentum: the async bound is tau x M
            "mode": {"name": "async", "max_staleness": 8},
            "guard": {"warmup_steps": 3, "window_steps": 2, "safety_factor": 2.0, **guard},
        }
    )


def _guarding(spec: JobSpec) -> tuple[Guarding, Reporter]:
    monitor = ConsistencyMonitor(window=spec.guard.window_steps)
    meter = Meter(monitor, False, 1)
    record = ModelOfRecord(RecordOptimizer(spec.optimizer, torch.zeros(2)))
    mode = make_mode(ModeContext(spec, 100, record, meter, ObservedNorms()))
    rep = Reporter(0.0, None, lambda: 0)
    return Guarding(spec, mode, monitor, (0.0, False), rep, []), rep


def _reply(step: int, grad: torch.Tensor, loss: float = 1.0) -> GradientReply:
    n = float(grad.norm())
    return GradientReply(worker=0, step=step, loss=loss, n=8, raw_norm=n, sent_norm=n)


def _warm(g: Guarding, steps: int, norm: float = 1.0, start: int = 0) -> None:
    for step in range(start, start + steps):
        grad = torch.tensor([norm, 0.0])
        g.see_reply(0, _reply(step, grad), grad)
        g.after_step(step + 1, 1.0, torch.zeros(2), can_rollback=False)


def _kinds(rep: Reporter, kind: EventKind) -> list[str]:
    return [e.detail for e in rep.event_log if e.kind is kind]


def test_the_bound_is_stated_after_the_warm_up_and_then_frozen() -> None:
    g, rep = _guarding(_spec())
    _warm(g, 2)
    assert g.stated is None and _kinds(rep, EventKind.BOUND) == []
    _warm(g, 1, start=2)  # step 3: the warm-up ends
    assert g.constants is not None and g.constants.m == pytest.approx(2.0)
    assert g.stated == pytest.approx(8 * 2.0)  # tau x M
    (stated,) = _kinds(rep, EventKind.BOUND)
    assert "M 2" in stated and "bound on B 16" in stated
    # huge gradients later: the bound does not move
    for step in range(3, 10):
        big = torch.tensor([1e12, 0.0])
        g.see_reply(0, _reply(step, big), big)
        g.after_step(step + 1, 1.0, torch.zeros(2), can_rollback=False)
    assert g.stated == pytest.approx(16.0)
    assert g.summary()["constants"]["M"] == pytest.approx(2.0)
    assert g.summary()["frozen_at_step"] == 3 and g.verdict() == "within"


def test_a_non_finite_gradient_is_divergence() -> None:
    g, _ = _guarding(_spec())
    bad = torch.tensor([math.nan, 0.0])
    g.see_reply(0, _reply(0, bad), bad)
    d = g.after_step(1, 1.0, torch.zeros(2), can_rollback=False)
    assert (d.condition, d.action) == (Condition.DIVERGED, Action.FAIL)
    assert "non-finite gradient" in d.reason


def test_tighten_switches_the_mode_and_states_the_bound_again() -> None:
    spec = _spec(on_out_of_bound="tighten")
    g, rep = _guarding(spec)
    _warm(g, 3)
    g.mode.staleness_max = 4  # type: ignore[attr-defined]  # the staleness the run used
    for b in (100.0, 100.0):  # the window's mean, 100 > 16
        g.monitor.record(3, b)
    d = g.after_step(4, 1.0, torch.zeros(2), can_rollback=False)
    assert d.action is Action.TIGHTEN and d.condition is Condition.OUT_OF_BOUND
    done = g.tighten(d.reason)
    assert done is not None and done[0].model_dump()["max_staleness"] == 2
    assert spec.mode.model_dump()["max_staleness"] == 2  # the job's setting, live
    assert g.stated == pytest.approx(2 * 2.0)
    (tightened,) = _kinds(rep, EventKind.GUARD)
    assert "mode.max_staleness 8 -> 2" in tightened and "out of bound" in tightened
    assert g.monitor.window_mean is None  # the new setting is judged afresh


def test_the_guard_state_survives_a_checkpoint(tmp_path: Path) -> None:
    spec = _spec()
    g, _ = _guarding(spec)
    _warm(g, 3)
    new = g.mode.tighten()  # nothing applied yet: min(8, 0) // 2 = 0
    assert new is not None and g.mode.retune(new) == 0
    state = g.state()
    rec = Recovery(tmp_path, spec.checkpoint)
    rec.write(
        CheckpointState(
            x=torch.zeros(2),
            opt={},
            step=3,
            version=6,
            samples=0,
            workers=[0],
            samplers={},
            fired=[],
            resizes=0,
            monitor=(0.0, 0, 0.0),
            norms={},
            elapsed_s=0.0,
            residuals={},
            torch_rng=torch.get_rng_state(),
            refused=0,
            dropped=0,
            t0=0.0,
            corrupted=0,
            refused_nonfinite=0,
            guard=state,
        )
    )
    loaded = latest_valid(tmp_path / "checkpoints")
    assert loaded is not None
    st = CheckpointState.from_dict(loaded.state)
    fresh, rep = _guarding(_spec())  # a restarted coordinator: the spec as submitted
    fresh.load(st.guard)
    assert fresh.constants is not None and g.constants is not None
    assert fresh.constants.public() == g.constants.public()  # L is nan: compare as reported
    assert fresh.stated == 0.0  # the bound of the checkpoint's setting: tau = 0
    assert fresh.spec.mode == spec.mode  # the tightened setting, not the submitted one
    assert fresh.policy.first_loss == 1.0
    assert _kinds(rep, EventKind.BOUND)  # restated from the checkpoint's constants
    old = dict(loaded.state)
    old.pop("guard")  # a checkpoint from before the guard
    assert CheckpointState.from_dict(old).guard == {}
