"""Unit tests for actors/modes (no Ray): each mode object driven through schedule, reply,
loss and leave with fake members and hand-made gradients, checked against the model of
record computed by hand; the registry and the per-mode bound terms."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from actors.consistency import (
    ConsistencyMonitor,
    Meter,
    ObservedNorms,
)
from actors.flat import ParamLayout
from actors.messages import GradientReply
from actors.modes.base import Mode, ModeContext, ModelOfRecord
from actors.modes.local import LocalEngine
from actors.modes.registry import MODES, analytic_bound, make_mode
from actors.optim import RecordOptimizer
from actors.warmup import Constants
from core.errors import SpecError
from core.spec import JobSpec, ModeSpec, match_sync_momentum, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

LR = 0.1


@dataclass
class FakeMember:
    id: int
    state: str = "idle"
    last_step: int | None = None


def _spec(mode: dict[str, Any], workers: int = 3, steps: int = 10, **extra: Any) -> JobSpec:
    return parse_spec(
        {"steps": steps, "workers": workers, "mode": mode, "optimizer": {"lr": LR}, **extra}
    )


def _mode(spec: JobSpec, dim: int = 3, blocks: list[tuple[int, int]] | None = None) -> Mode:
    layout = None
    if blocks is not None:  # one parameter per block, as the coordinator's layout has
        names = tuple(f"p{i}" for i in range(len(blocks)))
        shapes = tuple((hi - lo,) for lo, hi in blocks)
        layout = ParamLayout(names, shapes, tuple(lo for lo, _ in blocks), dim)
    record = ModelOfRecord(RecordOptimizer(spec.applied_optimizer(), torch.zeros(dim), layout))
    meter = Meter(ConsistencyMonitor(), False, spec.monitor_interval)
    meter.live_workers = lambda: spec.workers
    ctx = ModeContext(spec, spec.total_steps(100), record, meter, ObservedNorms(), blocks)
    mode = make_mode(ctx)
    for w in range(spec.workers):
        mode.join(w)
    return mode


def _consts(m: float) -> Constants:
    return Constants(m, m, 0.0, math.nan, warmup_steps=1, frozen_at_step=1, safety_factor=1.0)


def _reply(worker: int, step: int, grad: torch.Tensor, loss: float = 1.0) -> GradientReply:
    n = float(grad.norm())
    return GradientReply(worker=worker, step=step, loss=loss, n=32, raw_norm=n, sent_norm=n)


def _g(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- sync ---------------------------------------------------------------------------------


def test_sync_applies_the_mean_once_every_worker_replied() -> None:
    mode = _mode(_spec({"name": "sync"}))
    members = [FakeMember(i) for i in range(3)]
    ds = mode.schedule(members)
    assert [(d.worker, d.step, d.key) for d in ds] == [
        (0, 0, ("x", 0)),
        (1, 0, ("x", 0)),
        (2, 0, ("x", 0)),
    ]
    assert all(m.state == "busy" for m in members)
    assert mode.schedule(members) == []  # nobody is idle
    grads = [_g(1, 0, 0), _g(0, 2, 0), _g(0, 0, 3)]
    for m, g in zip(members[:2], grads[:2], strict=True):
        assert mode.on_reply(m, _reply(m.id, 0, g), g).accepted
    assert list(mode.apply_ready()) == []  # worker 2 still computes
    assert mode.schedule(members) == []  # sync: nobody starts step 1 before step 0 is applied
    mode.on_reply(members[2], _reply(2, 0, grads[2], loss=4.0), grads[2])
    applied = list(mode.apply_ready())
    assert len(applied) == 1 and applied[0].loss == pytest.approx(2.0)
    assert torch.allclose(mode.model.x, -LR * torch.stack(grads).mean(0))
    assert mode.step == 1 and mode.model.version == 1
    assert [d.step for d in mode.schedule(members)] == [1, 1, 1]
    assert mode.meter.monitor.b_max == 0.0 and mode.meter.monitor.count == 6  # 2 x 3 views


def test_sync_step_completes_without_a_worker_that_left() -> None:
    mode = _mode(_spec({"name": "sync"}))
    members = [FakeMember(i) for i in range(3)]
    mode.schedule(members)
    for m in members[:2]:
        mode.on_reply(m, _reply(m.id, 0, _g(1, 1, 1)), _g(1, 1, 1))
    assert mode.leave(2) == [0]  # it left step 0 without a gradient
    assert len(list(mode.apply_ready())) == 1
    assert torch.allclose(mode.model.x, -LR * _g(1, 1, 1))  # re-weighted over the two


@pytest.mark.parametrize(("policy", "divisor"), [("zero_fill", 3), ("reaverage", 2), ("own", 2)])
def test_lost_gradient_follows_the_missing_policy(policy: str, divisor: int) -> None:
    mode = _mode(_spec({"name": "sync"}, missing_policy=policy))
    members = [FakeMember(i) for i in range(3)]
    mode.schedule(members)
    for m in members[:2]:
        mode.on_reply(m, _reply(m.id, 0, _g(1, 0, 0)), _g(1, 0, 0))
    assert mode.on_lost(members[2], _reply(2, 0, _g(0, 3, 0)), _g(0, 3, 0)) is True
    (applied,) = list(mode.apply_ready())
    assert applied.loss == pytest.approx(1.0)
    assert torch.allclose(mode.model.x, -LR * _g(2, 0, 0) / divisor)
    assert mode.norms.lost_fraction_max == pytest.approx(1 / 3)
    mode.schedule(members)
    assert mode.meter.monitor.b_max > 0.0  # the next views are measured against x*


def test_an_unexpected_gradient_is_not_counted() -> None:
    mode = _mode(_spec({"name": "sync"}))
    m = FakeMember(0)
    verdict = mode.on_reply(m, _reply(0, 5, _g(1, 1, 1)), _g(1, 1, 1))
    assert not verdict.accepted and verdict.unexpected
    assert list(mode.apply_ready()) == []


# -- straggler ----------------------------------------------------------------------------


def test_straggler_starts_ahead_on_a_provisional_view() -> None:
    mode = _mode(_spec({"name": "straggler", "beta": 0.5, "max_lag": 2}))
    members = [FakeMember(i) for i in range(3)]
    mode.schedule(members)
    g0, g1 = _g(1, 0, 0), _g(0, 1, 0)
    mode.on_reply(members[0], _reply(0, 0, g0), g0)
    # worker 0 has only its own gradient of step 0: 0 of the 2 others < beta
    assert mode.schedule(members) == []
    mode.on_reply(members[1], _reply(1, 0, g1), g1)
    ds = mode.schedule(members)  # 1 of the 2 others arrived: 0.5 >= beta for both
    assert [d.worker for d in ds] == [0, 1] and all(d.step == 1 for d in ds)
    assert ds[0].key[0] == "p"
    # the view: x_0 plus the partial mean of step 0 over its 3 assigned workers
    assert torch.allclose(ds[0].view, -LR * (g0 + g1) / 3)
    assert mode.step == 0  # nothing applied yet: step 0 waits for worker 2


def test_straggler_beta_one_is_sync() -> None:
    mode = _mode(_spec({"name": "straggler", "beta": 1.0, "max_lag": 2}, workers=2))
    members = [FakeMember(i) for i in range(2)]
    mode.schedule(members)
    g = _g(1, 1, 1)
    mode.on_reply(members[0], _reply(0, 0, g), g)
    assert mode.schedule(members) == []  # waits for worker 1
    mode.on_reply(members[1], _reply(1, 0, g), g)
    assert len(list(mode.apply_ready())) == 1
    ds = mode.schedule(members)
    assert [d.key for d in ds] == [("x", 1), ("x", 1)]
    assert mode.meter.monitor.b_max == 0.0


def test_straggler_never_runs_more_than_max_lag_ahead() -> None:
    mode = _mode(_spec({"name": "straggler", "beta": 0.0, "max_lag": 1}, workers=2))
    members = [FakeMember(i) for i in range(2)]
    mode.schedule(members)
    g = _g(1, 1, 1)
    mode.on_reply(members[0], _reply(0, 0, g), g)
    (d,) = mode.schedule(members)  # beta 0: worker 0 starts step 1 at once
    assert d.step == 1
    mode.on_reply(members[0], _reply(0, 1, g), g)
    assert mode.schedule(members) == []  # step 2 would be 2 > max_lag ahead of step 0


# -- elastic (per block) ------------------------------------------------------------------

BLOCKS = [(0, 2), (2, 3), (3, 6)]


def _elastic(beta: float, max_lag: int = 2, workers: int = 2, **opt: Any) -> Mode:
    spec = _spec({"name": "elastic", "beta": beta, "max_lag": max_lag}, workers=workers)
    if opt:
        spec = spec.model_copy(update={"optimizer": spec.optimizer.model_copy(update=opt)})
    return _mode(spec, dim=6, blocks=BLOCKS)


# worker 0's gradient: block norms 5, 0, 1 (sum 6); worker 1's: 1, 2, 2
G0 = _g(3, 4, 0, 1, 0, 0)
G1 = _g(1, 0, 2, 0, 2, 0)


def _stream(
    mode: Mode,
    w: FakeMember,
    step: int,
    grad: torch.Tensor,
    blocks: list[int],
    loss: float = 0.5,
) -> None:
    """Announce ``blocks`` of ``grad`` (the worker's slot) ahead of its reply."""
    for b in blocks:
        lo, hi = BLOCKS[b]
        assert mode.on_block(w, step, b, float(grad[lo:hi].norm()), grad, loss)


def test_elastic_a_step_completed_from_streamed_blocks_records_their_losses() -> None:
    """Every block of both workers streamed in: the step completes before either reply,
    and its record has the mean of the losses the blocks brought; the replies add none."""
    mode = _elastic(1.0)
    members = [FakeMember(i) for i in range(2)]
    mode.schedule(members)
    _stream(mode, members[0], 0, G0, [2, 1, 0], loss=0.25)
    _stream(mode, members[1], 0, G1, [2, 1, 0], loss=0.75)
    (applied,) = list(mode.apply_ready())
    assert applied.loss == 0.5 and mode.step == 1
    for w, g in ((members[0], G0), (members[1], G1)):
        assert mode.on_reply(w, _reply(w.id, 0, g), g).accepted  # closes it, nothing more
    assert list(mode.apply_ready()) == []


def test_elastic_beta_one_waits_for_every_block_and_is_sync() -> None:
    mode = _elastic(1.0)
    members = [FakeMember(i) for i in range(2)]
    assert [d.step for d in mode.schedule(members)] == [0, 0]
    mode.on_reply(members[0], _reply(0, 0, G0), G0)
    _stream(mode, members[1], 0, G1, [2, 0])  # backward: last layers first
    assert list(mode.apply_ready()) == []  # blocks 0 and 2 applied, the step not complete
    assert torch.allclose(mode.model.x[0:2], -LR * (G0 + G1)[0:2] / 2)
    assert float(mode.model.x[2]) == 0.0  # block 1 still waits for worker 1
    # 5 + 1 of its 6 applied, the rest (block 1) is 0 in its own gradient: beta 1 still waits
    assert mode.schedule(members) == []
    mode.on_reply(members[1], _reply(1, 0, G1), G1)
    (applied,) = list(mode.apply_ready())
    assert applied.consistent and mode.step == 1
    assert torch.allclose(mode.model.x, -LR * (G0 + G1) / 2)
    ds = mode.schedule(members)
    assert [d.step for d in ds] == [1, 1]
    assert all(torch.equal(d.view, mode.model.x) for d in ds)
    assert mode.meter.monitor.count == 4 and mode.meter.monitor.b_max == 0.0  # 2 steps x 2


@pytest.mark.parametrize(("beta", "starts"), [(0.0, True), (0.5, True), (0.9, False)])
def test_elastic_starts_once_the_applied_blocks_reach_beta_of_its_own(
    beta: float, starts: bool
) -> None:
    mode = _elastic(beta)
    members = [FakeMember(i) for i in range(2)]
    mode.schedule(members)
    mode.on_reply(members[0], _reply(0, 0, G0), G0)
    if beta == 0.0:  # beta 0: at once, on x_0
        (d,) = mode.schedule(members)
        assert d.step == 1 and torch.equal(d.view, torch.zeros(6))
        return
    assert mode.schedule(members) == []  # nothing of step 0 applied yet
    _stream(mode, members[1], 0, G1, [0])
    assert list(mode.apply_ready()) == []
    assert mode.applied_share(0) == pytest.approx(5 / 6)  # type: ignore[attr-defined]
    ds = mode.schedule(members)
    assert [d.step for d in ds] == ([1] if starts else [])
    if starts:  # the view: block 0 has step 0's update, blocks 1 and 2 lack it
        want = torch.zeros(6)
        want[0:2] = -LR * (G0 + G1)[0:2] / 2
        assert torch.allclose(ds[0].view, want)


def test_elastic_late_blocks_apply_on_arrival_and_b_hat_is_their_missing_update() -> None:
    mode = _elastic(0.5)
    members = [FakeMember(i) for i in range(2)]
    mode.schedule(members)  # two sampled views of x_0: exact, B-hat 0
    mode.on_reply(members[0], _reply(0, 0, G0), G0)
    _stream(mode, members[1], 0, G1, [0])
    list(mode.apply_ready())
    (d,) = mode.schedule(members)  # worker 0 on step 1, blocks 1 and 2 late
    assert d.worker == 0 and d.step == 1
    mode.on_reply(members[1], _reply(1, 0, G1), G1)  # the late blocks arrive
    (applied,) = list(mode.apply_ready())
    assert mode.step == 1 and applied.consistent
    x1 = -LR * (G0 + G1) / 2
    assert torch.allclose(mode.model.x, x1)
    # B-hat of worker 0's view: ||x_1 - v|| / lr over the late blocks = their mean gradient
    want = float(((G0 + G1) / 2)[2:].norm())
    assert mode.meter.monitor.count == 3
    assert mode.meter.monitor.b_max == pytest.approx(want, rel=1e-5)
    assert mode.meter.monitor.b_max > 0


def test_elastic_never_runs_more_than_max_lag_ahead() -> None:
    mode = _elastic(0.0, max_lag=1)
    members = [FakeMember(i) for i in range(2)]
    mode.schedule(members)
    mode.on_reply(members[0], _reply(0, 0, G0), G0)
    (d,) = mode.schedule(members)
    assert d.step == 1
    mode.on_reply(members[0], _reply(0, 1, G0), G0)
    assert mode.schedule(members) == []  # step 2 would be 2 > max_lag ahead of step 0
    _stream(mode, members[1], 0, G1, [0, 1, 2])
    list(mode.apply_ready())  # step 0 complete: no block of step 1 yet (worker 1 owes it)
    assert mode.step == 1


def test_elastic_block_order_does_not_change_the_model_of_record() -> None:
    """Blocks of two steps arriving in a skewed order (one block two steps ahead) give the
    same model, momentum included, as applying each step's mean whole."""
    mode = _elastic(0.0, max_lag=2, momentum=0.9, weight_decay=0.01)
    members = [FakeMember(i) for i in range(2)]
    grads = {
        (w, s): torch.randn(6, generator=torch.Generator().manual_seed(10 * w + s))
        for w in range(2)
        for s in range(2)
    }
    mode.schedule(members)
    mode.on_reply(members[0], _reply(0, 0, grads[0, 0]), grads[0, 0])
    mode.schedule(members)  # worker 0 -> step 1
    _stream(mode, members[1], 0, grads[1, 0], [2])
    list(mode.apply_ready())
    mode.on_reply(members[0], _reply(0, 1, grads[0, 1]), grads[0, 1])
    mode.on_reply(members[1], _reply(1, 0, grads[1, 0]), grads[1, 0])
    done = list(mode.apply_ready())
    assert mode.step == 1
    # worker 1 -> step 1 (scheduled alone: worker 0 would start step 2 and worker 1 jump)
    assert [d.step for d in mode.schedule([members[1]])] == [1]
    mode.on_reply(members[1], _reply(1, 1, grads[1, 1]), grads[1, 1])
    done += list(mode.apply_ready())
    assert mode.step == 2 and len(done) == 2
    ref = RecordOptimizer(mode.spec.optimizer, torch.zeros(6))
    for s in range(2):
        ref.step(grads[0, s] + grads[1, s], scale=0.5)
    assert torch.allclose(mode.model.x, ref.x, atol=1e-6)


# -- async --------------------------------------------------------------------------------


def test_async_refuses_a_gradient_older_than_tau() -> None:
    mode = _mode(_spec({"name": "async", "max_staleness": 0}, workers=2))
    members = [FakeMember(i) for i in range(2)]
    assert [d.key for d in mode.schedule(members)] == [("x", 0), ("x", 0)]
    g = _g(1, 2, 3)
    assert mode.on_reply(members[0], _reply(0, 0, g), g).accepted
    (applied,) = list(mode.apply_ready())
    assert not applied.record  # one step is 2 updates
    assert torch.allclose(mode.model.x, -LR * g)
    verdict = mode.on_reply(members[1], _reply(1, 0, g), g)
    assert verdict.refused_stale and not verdict.accepted and members[1].state == "idle"
    assert list(mode.apply_ready()) == [] and mode.model.version == 1


def test_async_wait_holds_a_fresher_gradient_back() -> None:
    mode = _mode(_spec({"name": "async", "max_staleness": 1, "on_stale": "wait"}, workers=3))
    members = [FakeMember(i) for i in range(3)]
    # tau = 1: at most 2 gradients in flight on version 0 (the third would land 2 late)
    assert [d.worker for d in mode.schedule(members)] == [0, 1]
    g = _g(1, 0, 0)
    mode.on_reply(members[0], _reply(0, 0, g), g)
    assert len(list(mode.apply_ready())) == 1  # worker 1's gradient still lands within tau
    (d,) = mode.schedule(members)
    assert (d.worker, d.key) == (0, ("x", 1))
    mode.on_reply(members[0], _reply(0, 0, g), g)  # on view 1: would leave worker 1 late
    assert list(mode.apply_ready()) == [] and members[0].state == "held"
    mode.on_reply(members[1], _reply(1, 0, g), g)
    assert len(list(mode.apply_ready())) == 2  # the oldest view first, then the held one
    assert mode.model.version == 3


def test_async_finishes_after_workers_times_steps_updates() -> None:
    mode = _mode(_spec({"name": "async"}, workers=2, steps=1))
    members = [FakeMember(i) for i in range(2)]
    g = _g(1, 1, 1)
    for _ in range(2):
        for d in mode.schedule(members):
            m = members[d.worker]
            mode.on_reply(m, _reply(m.id, 0, g), g)
        list(mode.apply_ready())
    assert mode.finished() and mode.step == 1
    assert mode.schedule(members) == []


def test_async_tightens_to_half_the_staleness_it_used_and_refuses_what_it_no_longer_admits() -> (
    None
):
    mode = _mode(_spec({"name": "async", "max_staleness": 100, "on_stale": "wait"}, workers=3))
    members = [FakeMember(i) for i in range(3)]
    assert len(mode.schedule(members)) == 3  # all on version 0
    g = _g(1, 0, 0)
    for m in members[:2]:
        mode.on_reply(m, _reply(m.id, 0, g), g)
    assert len(list(mode.apply_ready())) == 2  # the second landed 1 update late
    new = mode.tighten()
    assert new is not None and new.name == "async"
    assert new.max_staleness == 0  # min(tau, 1 seen) // 2
    assert mode.spec.mode.max_staleness == 100  # a proposal: nothing changed yet
    assert mode.on_reply(members[2], _reply(2, 0, g), g).accepted  # 2 late, within 100
    assert members[2].state == "held"
    refused = mode.retune(new)
    assert mode.spec.mode == new
    # worker 2's gradient sits on view 0 at version 2: past the new tau = 0, refused
    assert refused == 1 and members[2].state == "idle"
    assert list(mode.apply_ready()) == [] and mode.model.version == 2
    assert mode.tighten() is None  # tau = 0: nothing stricter


def test_step_modes_tighten_within_their_settings() -> None:
    assert _mode(_spec({"name": "sync"})).tighten() is None
    elastic = _mode(_spec({"name": "elastic", "beta": 0.5, "max_lag": 4}))
    # a larger share to wait for first (0.5 -> 0.75 -> 1 = sync), then a smaller lag
    for want in ({"beta": 0.75}, {"beta": 1.0}, {"max_lag": 2}, {"max_lag": 1}):
        new = elastic.tighten()
        assert new is not None
        assert {k: new.model_dump()[k] for k in want} == want
        elastic.retune(new)
    assert elastic.spec.mode.model_dump()["max_lag"] == 1
    assert elastic.tighten() is None  # beta 1, max_lag 1
    straggler = _mode(_spec({"name": "straggler", "beta": 0.5, "max_lag": 2}))
    new = straggler.tighten()
    assert new is not None and new.model_dump()["beta"] == 0.75
    local = _mode(_spec({"name": "local", "local_steps": 4}))
    new = local.tighten()
    assert new is not None and new.model_dump()["local_steps"] == 2
    local.retune(new)
    assert local.local_steps() == 2
    local.retune(local.spec.mode.model_copy(update={"local_steps": 1}))
    assert local.tighten() is None  # H = 1 is sync


# -- local --------------------------------------------------------------------------------


def test_local_asks_for_h_steps_and_measures_the_replica_spread() -> None:
    mode = _mode(_spec({"name": "local", "local_steps": 4}))
    assert isinstance(mode, LocalEngine) and mode.local_steps() == 4
    members = [FakeMember(i) for i in range(3)]
    ds = mode.schedule(members)
    assert all(d.key == ("x", 0) for d in ds)
    assert mode.meter.monitor.count == 0  # views are x: nothing measured at dispatch
    ps = [_g(3, 0, 0), _g(0, 3, 0), _g(0, 0, 0)]
    for m, p in zip(members, ps, strict=True):
        mode.on_reply(m, _reply(m.id, 0, p), p)
    assert len(list(mode.apply_ready())) == 1
    mean = torch.stack(ps).mean(0)
    assert torch.allclose(mode.model.x, -LR * mean)  # plain SGD: the average of the replicas
    spread = max(float((p - mean).norm()) for p in ps)
    assert mode.meter.monitor.count == 1
    assert mode.meter.monitor.b_max == pytest.approx(spread)
    # each p_i here is one message of H = 4 local gradients: ||p_i|| <= H M with M = 3 / 4
    assert spread <= LocalEngine.bound_term(mode.spec, _consts(3.0 / 4))


def test_local_with_one_step_is_sync() -> None:
    out = []
    for mode_spec in ({"name": "sync"}, {"name": "local", "local_steps": 1}):
        spec = _spec(mode_spec, optimizer={"lr": LR, "momentum": 0.9, "weight_decay": 1e-3})
        mode = _mode(spec)
        members = [FakeMember(i) for i in range(3)]
        for step in range(3):
            for d in mode.schedule(members):
                g = _g(d.worker + 1.0, step, -1.0)
                mode.on_reply(members[d.worker], _reply(d.worker, d.step, g), g)
            list(mode.apply_ready())
        out.append(mode.model.x.clone())
    assert torch.equal(out[0], out[1])


def test_local_bound_is_two_h_m() -> None:
    spec = _spec({"name": "local", "local_steps": 8})
    assert analytic_bound(spec, _consts(2.5), 0.0, False) == pytest.approx(2 * 8 * 2.5)


# -- registry -----------------------------------------------------------------------------


def test_every_mode_of_the_spec_is_registered() -> None:
    (union, _) = typing.get_args(ModeSpec)
    names = {
        typing.get_args(cls.model_fields["name"].annotation)[0] for cls in typing.get_args(union)
    }
    assert names == set(MODES)
    for name, cls in MODES.items():
        assert cls.name == name


def test_restore_continues_the_step_count() -> None:
    mode = _mode(_spec({"name": "sync"}))
    mode.restore(7)
    assert mode.step == 7
    for w in range(3):
        mode.join(w)
    assert {d.step for d in mode.schedule([FakeMember(i) for i in range(3)])} == {7}


def test_elastic_reply_after_its_streamed_step_completed_is_accepted_once() -> None:
    mode = _elastic(0.5)
    members = [FakeMember(i) for i in range(2)]
    mode.schedule(members)
    mode.on_reply(members[0], _reply(0, 0, G0), G0)
    # all of worker 1's blocks, its reply not yet in: its loss came with the blocks
    _stream(mode, members[1], 0, G1, [2, 1, 0], loss=0.5)
    (applied,) = list(mode.apply_ready())
    assert mode.step == 1 and applied.loss == 0.75  # worker 0's reply 1.0, worker 1's 0.5
    v = mode.on_reply(members[1], _reply(1, 0, G1), G1)
    assert v.accepted and members[1].state == "waiting" and members[1].last_step == 0
    again = mode.on_reply(members[1], _reply(1, 0, G1), G1)
    assert again.unexpected and not again.accepted
    assert torch.allclose(mode.model.x, -LR * (G0 + G1) / 2)


# -- bounds for adaptive optimizers (docs/consistency.md, "Adaptive optimizers") -----------


def _adam(mode: dict[str, Any]) -> JobSpec:
    return parse_spec({"steps": 10, "workers": 4, "mode": mode, "optimizer": {"name": "adamw"}})


def test_adaptive_bounds_are_written_in_u_not_m() -> None:
    c = Constants(2.0, 2.0, 0.5, math.nan, warmup_steps=1, frozen_at_step=1, safety_factor=1.0)
    c = dataclasses.replace(c, u=3.0)
    elastic = _adam({"name": "elastic", "beta": 0.25, "max_lag": 2})
    assert analytic_bound(elastic, c, 0.0, False) == pytest.approx(0.75 * 2 * 2 * 3.0)
    straggler = _adam({"name": "straggler", "beta": 0.5, "max_lag": 3})
    assert analytic_bound(straggler, c, 0.0, False) == pytest.approx(2 * 3 * 3.0)
    asynchronous = _adam({"name": "async", "max_staleness": 5})
    assert analytic_bound(asynchronous, c, 0.0, False) == pytest.approx(5 * 3.0)
    # local steps are plain SGD on the replicas: still 2HM, in gradient units
    local = _adam({"name": "local", "local_steps": 4})
    assert analytic_bound(local, c, 0.0, False) == pytest.approx(2 * 4 * 2.0)
    assert analytic_bound(_adam({"name": "sync"}), c, 0.0, False) == 0.0
    # U never measured (a one-step warm-up): the bound is not stated, never 0
    unmeasured = dataclasses.replace(c, u=math.nan)
    assert math.isnan(analytic_bound(elastic, unmeasured, 0.0, False))
    # with SGD the same constants give M's bound
    sgd = _spec({"name": "async", "max_staleness": 5})
    assert analytic_bound(sgd, c, 0.0, False) == pytest.approx(5 * 2.0)


def test_elastic_with_clipping_applies_a_step_whole_once_every_block_is_in() -> None:
    """The global norm needs the whole averaged gradient: no block applies early, and the
    step is the clipped mean, as one torch step over it."""
    mode = _elastic(0.0, clip_grad_norm=1.0)
    members = [FakeMember(i) for i in range(2)]
    mode.schedule(members)
    mode.on_reply(members[0], _reply(0, 0, G0), G0)
    _stream(mode, members[1], 0, G1, [2, 0])
    assert list(mode.apply_ready()) == []
    assert torch.equal(mode.model.x, torch.zeros(6))  # blocks 0 and 2 are in, not applied
    mode.on_reply(members[1], _reply(1, 0, G1), G1)
    (applied,) = list(mode.apply_ready())
    assert applied.consistent and mode.step == 1 and mode.model.opt.steps == 1
    mean = (G0 + G1) / 2  # norm 3.2 > 1: clipped to norm 1
    assert torch.allclose(mode.model.x, -LR * mean / float(mean.norm()), atol=1e-6)
    # the job says so at its start (a warning event): it waits as sync does
    (note,) = mode.start_notes()
    assert "clip_grad_norm" in note and "sync" in note
    assert _elastic(0.5).start_notes() == []


# -- async: momentum_scaling --------------------------------------------------------------


@pytest.mark.parametrize(
    ("mu", "p", "want"), [(0.9, 4, 0.6), (0.99, 4, 0.96), (0.9, 10, 0.0), (0.0, 4, 0.0)]
)
def test_match_sync_momentum_gives_each_gradient_a_sync_steps_share(
    mu: float, p: int, want: float
) -> None:
    assert match_sync_momentum(mu, p) == pytest.approx(want)


def _async_momentum(scaling: str, momentum: float = 0.9, workers: int = 4) -> JobSpec:
    return _spec(
        {"name": "async", "max_staleness": 3, "momentum_scaling": scaling},
        workers=workers,
        optimizer={"lr": LR, "momentum": momentum},
    )


def test_async_match_sync_applies_the_scaled_momentum_and_its_bound_uses_it() -> None:
    c = _consts(2.0)
    scaled, as_set = _async_momentum("match_sync"), _async_momentum("as_set")
    assert scaled.optimizer.momentum == 0.9  # the spec keeps what the user gave
    mode = _mode(scaled)
    assert mode.model.opt.spec.momentum == pytest.approx(0.6)
    assert mode.model.opt.opt.param_groups[0]["momentum"] == pytest.approx(0.6)
    assert analytic_bound(scaled, c, 0.0, False) == pytest.approx(3 * 2.0 / 0.4)
    assert analytic_bound(as_set, c, 0.0, False) == pytest.approx(3 * 2.0 / 0.1)
    (note,) = mode.start_notes()
    assert "0.9" in note and "0.6" in note and "4 workers" in note
    assert _mode(as_set).start_notes() == []


def test_async_match_sync_moves_p_updates_as_far_as_one_sync_step_in_the_long_run() -> None:
    """The rule's claim, on a constant gradient: once momentum is in steady state, p async
    updates move x by what one sync step of the same optimizer moves it (lr / (1 - mu))."""
    g = _g(1.0, -2.0, 0.5)
    sync = _mode(
        _spec({"name": "sync"}, workers=4, steps=400, optimizer={"lr": LR, "momentum": 0.9})
    )
    rec_sync = sync.model.opt
    rec_async = _mode(_async_momentum("match_sync")).model.opt
    for _ in range(200):
        rec_sync.step(g)
        for _ in range(4):
            rec_async.step(g)
    before_s, before_a = rec_sync.x.clone(), rec_async.x.clone()
    rec_sync.step(g)
    for _ in range(4):
        rec_async.step(g)
    assert torch.allclose(rec_async.x - before_a, rec_sync.x - before_s, rtol=1e-4)
    assert torch.allclose(rec_sync.x - before_s, -LR * g / 0.1, rtol=1e-4)
    # as set, the same p updates move it p times as far
    plain = _mode(_async_momentum("as_set")).model.opt
    for _ in range(800):
        plain.step(g)
    b = plain.x.clone()
    for _ in range(4):
        plain.step(g)
    assert torch.allclose(plain.x - b, 4 * (rec_sync.x - before_s), rtol=1e-3)


def test_match_sync_with_adam_is_refused_naming_the_field() -> None:
    with pytest.raises(SpecError) as err:
        _spec(
            {"name": "async", "momentum_scaling": "match_sync"},
            optimizer={"name": "adamw", "lr": 0.01},
        )
    assert "mode.momentum_scaling" in str(err.value) and "as_set" in str(err.value)
