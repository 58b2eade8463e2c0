"""Unit tests for the ``corrupt`` fault and the coordinator's defence (no Ray).

* the spec: ``corruption`` / ``scale_factor`` validated, with messages that say what to
  change;
* the worker side: which gradients a window (in steps, in seconds, or a probability)
  corrupts, and what a corruption does to a gradient;
* the defence: :func:`~actors.faults.screen_gradient` refuses any gradient with a
  non-finite entry and accepts every finite one, however large;
* the coordinator's receive path (:meth:`actors.coordinator.training.Training.handle_reply`
  of a :class:`~actors.coordinator.loop.CoordinatorCore` built in this process, its workers
  replaced by slots fed with replies built here): a non-finite gradient is refused, counted,
  recorded and never applied, its step goes on by the missing policy; a scaled (finite)
  gradient is applied.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from actors.coordinator.loop import CoordinatorCore
from actors.coordinator.slot import WorkerSlot
from actors.faults import (
    Corruption,
    GradientVerdict,
    WorkerFaults,
    bind_plan,
    screen_gradient,
)
from actors.messages import GradientReply
from actors.modes.stepped import StepEngine
from actors.transport import to_wire
from core.errors import SpecError
from core.events import EventKind, FaultKind
from core.spec import FaultSpec, JobSpec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


# -- the spec -------------------------------------------------------------------------------


def _job(**fault: Any) -> JobSpec:
    return parse_spec({"steps": 10, "faults": [fault]})


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"kind": "corrupt", "workers": [0]}, "corrupt needs corruption: nan, inf or scale"),
        ({"kind": "corrupt", "corruption": "scale"}, "corruption: scale needs scale_factor"),
        (
            {"kind": "corrupt", "corruption": "scale", "scale_factor": 1.0},
            "scale_factor 1 leaves the gradient unchanged",
        ),
        (
            {"kind": "corrupt", "corruption": "nan", "scale_factor": 2.0},
            "scale_factor is only allowed with corruption: scale",
        ),
        (
            {"kind": "delay", "delay_ms": 5.0, "corruption": "nan"},
            "only allowed for corrupt faults",
        ),
        ({"kind": "corrupt", "corruption": "zero"}, "faults.0.corruption"),
        (
            {"kind": "corrupt", "corruption": "scale", "scale_factor": 1e7},
            "faults.0.scale_factor: Input should be less than or equal to 1000000",
        ),
        ({"kind": "corrupt", "corruption": "nan", "steps": [3]}, "only allowed for drop"),
        (
            {"kind": "corrupt", "corruption": "nan", "at_step": 2, "probability": 0.5},
            "give one trigger",
        ),
    ],
)
def test_a_bad_corrupt_fault_is_refused_with_what_to_change(
    fault: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError) as err:
        _job(**fault)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "corrupt", "corruption": "nan"},
        {"kind": "corrupt", "count": 2, "corruption": "inf", "at_s": 1.0, "duration_s": 2.0},
        {"kind": "corrupt", "corruption": "scale", "scale_factor": -1.0, "probability": 0.1},
        {"kind": "corrupt", "corruption": "scale", "scale_factor": 0.0, "at_step": 3},
    ],
)
def test_good_corrupt_faults_are_accepted(fault: dict[str, Any]) -> None:
    (f,) = _job(**fault).faults
    assert f.kind == "corrupt" and f.corruption == fault["corruption"]


# -- the worker side ------------------------------------------------------------------------


def _worker(worker: int, *specs: dict[str, Any], seed: int = 0) -> WorkerFaults:
    plan = bind_plan([FaultSpec(**s) for s in specs], list(range(4)), seed)
    return WorkerFaults(plan, worker, seed)


def test_corruptions_do_what_they_say() -> None:
    for name, check in (("nan", torch.isnan), ("inf", torch.isposinf)):
        g = torch.tensor([1.0, -2.0, 0.0])
        Corruption(name).apply(g)  # type: ignore[arg-type]
        assert bool(check(g).all()), name
    g = torch.tensor([1.0, -2.0, 0.0])
    Corruption("scale", -3.0).apply(g)
    assert g.tolist() == [-3.0, 6.0, -0.0]


def test_a_step_window_corrupts_its_steps_only_and_only_its_target() -> None:
    spec = {
        "kind": "corrupt",
        "workers": [2],
        "corruption": "nan",
        "at_step": 3,
        "duration_steps": 2,
    }
    hit = _worker(2, spec)
    assert [s for s in range(8) if hit.on_gradient(s, 0.0).corrupted] == [3, 4]
    other = _worker(1, spec)
    assert not any(other.on_gradient(s, 0.0).corrupted for s in range(8))


def test_a_seconds_window_corrupts_by_the_clock() -> None:
    wf = _worker(
        0,
        {
            "kind": "corrupt",
            "workers": [0],
            "corruption": "scale",
            "scale_factor": 4.0,
            "at_s": 1.0,
            "duration_s": 1.0,
        },
    )
    times = [0.5, 1.0, 1.5, 2.0, 3.0]
    got = [wf.on_gradient(s, t).corruptions for s, t in enumerate(times)]
    scaled = (Corruption("scale", 4.0),)
    assert got == [(), scaled, scaled, (), ()]


def test_a_probabilistic_corruption_hits_that_fraction_and_replays() -> None:
    spec = {"kind": "corrupt", "workers": [1], "corruption": "inf", "probability": 0.25}
    wa, wb, wc = _worker(1, spec, seed=4), _worker(1, spec, seed=4), _worker(1, spec, seed=5)
    a = [wa.on_gradient(s, 0.0).corrupted for s in range(4000)]
    assert a == [wb.on_gradient(s, 0.0).corrupted for s in range(4000)]
    assert a != [wc.on_gradient(s, 0.0).corrupted for s in range(4000)]
    # 4,000 draws at p = 0.25: the standard deviation of the fraction is ~0.007
    assert np.mean(a) == pytest.approx(0.25, abs=0.03)


def test_corruption_and_delay_combine_on_one_gradient() -> None:
    wf = _worker(
        0,
        {"kind": "delay", "workers": [0], "delay_ms": 20.0},
        {"kind": "corrupt", "workers": [0], "corruption": "scale", "scale_factor": 2.0},
        {"kind": "corrupt", "workers": [0], "corruption": "nan"},
    )
    effect = wf.on_gradient(0, 0.0)
    assert effect.delay_s == pytest.approx(0.02)
    assert effect.corruptions == (Corruption("scale", 2.0), Corruption("nan"))
    g = torch.ones(3)
    for c in effect.corruptions:
        c.apply(g)
    assert bool(torch.isnan(g).all())


# -- the defence ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_entry_is_enough_to_refuse(bad: float) -> None:
    g = torch.zeros(10_000)
    g[7_777] = bad
    assert screen_gradient(g) is GradientVerdict.REFUSE_NONFINITE


def test_infinities_of_both_signs_are_refused() -> None:
    g = torch.ones(10_000)
    g[3], g[9_000] = float("inf"), float("-inf")  # they sum to NaN, not to a finite value
    assert screen_gradient(g) is GradientVerdict.REFUSE_NONFINITE


def test_every_finite_gradient_is_accepted_however_large() -> None:
    assert screen_gradient(torch.zeros(5)) is GradientVerdict.ACCEPT
    big = torch.full((5,), 3e38)  # near float32's largest finite value
    assert screen_gradient(big) is GradientVerdict.ACCEPT
    assert screen_gradient(torch.ones(5).mul_(1e6)) is GradientVerdict.ACCEPT


# -- the coordinator's receive path ---------------------------------------------------------

WORKERS = 4
LR = 0.1


def _coordinator(mode: str, policy: str = "zero_fill") -> CoordinatorCore:
    """A coordinator without Ray: its four workers are slots fed with replies built here."""
    spec = parse_spec(
        {
            "steps": 2,
            "workers": WORKERS,
            "mode": {"name": mode},
            "optimizer": {"lr": LR},
            "eval_interval": 1000,
            "transport": "object_store",
            "missing_policy": policy,
        }
    )
    c = CoordinatorCore("unit-corrupt", spec)
    for wid in range(WORKERS):
        c.members.workers[wid] = WorkerSlot(id=wid, actor=None, state="idle")
        c.mode.join(wid)
    return c


def _dispatch(c: CoordinatorCore, step: int) -> None:
    """Every worker starts ``step`` (the mode hands out the views, as the loop would)."""
    got = c.mode.schedule(c.members.live())
    assert sorted((d.worker, d.step) for d in got) == [(w, step) for w in range(WORKERS)]


def _reply(wid: int, step: int, grad: torch.Tensor, corrupted: bool = False) -> GradientReply:
    norm = float(grad.norm())
    return GradientReply(
        worker=wid,
        step=step,
        loss=1.0,
        n=32,
        raw_norm=norm,
        sent_norm=norm,
        corrupted=corrupted,
        sampler_pos={"epoch": 0, "pos": 32 * (step + 1)},
        grad=to_wire(grad, "float32"),
    )


def _handle(c: CoordinatorCore, wid: int, reply: GradientReply) -> None:
    assert c.train.handle_reply(c.members.workers[wid], reply, None) is None


def _grads(c: CoordinatorCore) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(c.layout.numel, generator=gen) for _ in range(WORKERS)]


def _refused(c: CoordinatorCore) -> list[Any]:
    return [e for e in c.reporter.event_log if e.kind is EventKind.REFUSED]


@pytest.mark.parametrize("policy", ["zero_fill", "reaverage"])
def test_a_non_finite_gradient_is_refused_and_its_step_goes_on_without_it(policy: str) -> None:
    c = _coordinator("sync", policy)
    x0 = c.record.x.clone()
    grads = _grads(c)
    _dispatch(c, 0)
    bad = grads[2].clone()
    bad[5] = float("nan")
    for wid in range(WORKERS):
        g, marked = (bad, True) if wid == 2 else (grads[wid], False)
        _handle(c, wid, _reply(wid, 0, g, marked))
    assert c.step == 1, "the step completed without the refused gradient"
    assert bool(torch.isfinite(c.record.x).all())
    # zero_fill: the 3 finite gradients over the 4 the step expected; reaverage: over the 3
    n = WORKERS if policy == "zero_fill" else WORKERS - 1
    kept = grads[0] + grads[1] + grads[3]
    assert torch.allclose(c.record.x, x0 - LR * kept / n, atol=1e-6)
    assert (c.train.corrupted, c.train.refused_nonfinite) == (1, 1)
    (ev,) = _refused(c)
    assert (ev.fault, ev.target, ev.step) == (FaultKind.CORRUPT, "worker-2", 0)
    assert f"missing, policy {policy}" in ev.detail
    s = c.summary()
    assert (s["gradients_corrupted"], s["gradients_refused_nonfinite"]) == (1, 1)
    assert s["dropped_gradients"] == 0
    # the refused gradient is no part of the consistent model: nothing for the B̂ monitor
    assert isinstance(c.mode, StepEngine) and not c.mode.lost_grads
    assert c.norms.lost_fraction_max == 0.0 and math.isfinite(c.norms.grad_max)
    assert c.members.workers[2].steps_done == 0 and c.train.samples == 3 * 32


def test_an_unmarked_non_finite_gradient_is_refused_too() -> None:
    """A gradient that went non-finite on its own (a diverging run): the check reads values,
    not the injector's mark."""
    c = _coordinator("sync")
    x0 = c.record.x.clone()
    _dispatch(c, 0)
    _handle(c, 0, _reply(0, 0, torch.full((c.layout.numel,), math.inf)))
    (ev,) = _refused(c)
    assert ev.fault is None and ev.target == "worker-0"
    assert (c.train.corrupted, c.train.refused_nonfinite) == (0, 1)
    assert torch.equal(c.record.x, x0)


def test_a_scaled_finite_gradient_is_applied() -> None:
    c = _coordinator("sync")
    x0 = c.record.x.clone()
    grads = _grads(c)
    _dispatch(c, 0)
    for wid in range(WORKERS):
        g, marked = (grads[wid] * 100.0, True) if wid == 1 else (grads[wid], False)
        _handle(c, wid, _reply(wid, 0, g, marked))
    assert c.step == 1
    applied = grads[0] + 100.0 * grads[1] + grads[2] + grads[3]
    assert torch.allclose(c.record.x, x0 - LR * applied / WORKERS, atol=1e-5)
    assert (c.train.corrupted, c.train.refused_nonfinite) == (1, 0)
    assert not _refused(c)


def test_async_a_non_finite_gradient_is_not_applied_and_the_worker_goes_on() -> None:
    c = _coordinator("async")
    x0 = c.record.x.clone()
    grads = _grads(c)
    _dispatch(c, 0)
    _handle(c, 0, _reply(0, 0, grads[0] * math.nan, True))
    assert torch.equal(c.record.x, x0) and c.record.version == 0
    assert c.members.workers[0].state == "idle"
    (ev,) = _refused(c)
    assert ev.fault is FaultKind.CORRUPT and "not applied" in ev.detail
    _handle(c, 1, _reply(1, 0, grads[1]))
    assert c.record.version == 1
    assert torch.allclose(c.record.x, x0 - LR * grads[1], atol=1e-6)
    assert (c.train.corrupted, c.train.refused_nonfinite) == (1, 1)
