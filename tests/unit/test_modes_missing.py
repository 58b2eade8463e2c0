"""Unit tests for missing gradients (no Ray): the step engine driven with fake members and
hand-made gradients on a 3-parameter model, momentum 0.5, checked against vectors worked
out by hand: what the model of record applies under each policy, each worker's view under
``own``, the consistent sequence ``x*`` (its momentum carries the lost share) and the B̂ of
each view against it, and a step whose every gradient was lost."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from actors.consistency import ConsistencyMonitor, Meter, ObservedNorms
from actors.messages import GradientReply
from actors.modes.base import ModeContext, ModelOfRecord
from actors.modes.missing import ShadowModel, divisor, own_views
from actors.modes.registry import make_mode
from actors.modes.stepped import StepEngine
from actors.optim import RecordOptimizer
from core.errors import SpecError
from core.spec import OptimizerSpec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

LR, MU = 0.1, 0.5
ONES = torch.ones(3)


@dataclass
class FakeMember:
    id: int
    state: str = "idle"
    last_step: int | None = None


def _g(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _reply(worker: int, step: int, grad: torch.Tensor) -> GradientReply:
    n = float(grad.norm())
    return GradientReply(worker=worker, step=step, loss=1.0, n=32, raw_norm=n, sent_norm=n)


def _engine(policy: str, workers: int = 3) -> StepEngine:
    spec = parse_spec(
        {
            "steps": 10,
            "workers": workers,
            "mode": {"name": "sync"},
            "optimizer": {"lr": LR, "momentum": MU},
            "missing_policy": policy,
        }
    )
    record = ModelOfRecord(RecordOptimizer(spec.optimizer, torch.zeros(3)))
    meter = Meter(ConsistencyMonitor(), False, 1)
    mode = make_mode(ModeContext(spec, 10, record, meter, ObservedNorms()))
    assert isinstance(mode, StepEngine)
    for w in range(workers):
        mode.join(w)
    return mode


def _step(
    mode: StepEngine,
    members: list[FakeMember],
    step: int,
    arrive: dict[int, torch.Tensor],
    lose: dict[int, torch.Tensor],
) -> None:
    """Schedule everyone on ``step``, deliver / lose their gradients, apply the step."""
    assert [d.step for d in mode.schedule(members)] == [step] * len(members)
    for wid, g in arrive.items():
        assert mode.on_reply(members[wid], _reply(wid, step, g), g).accepted
    for wid, g in lose.items():
        assert mode.on_lost(members[wid], _reply(wid, step, g), g)
    (applied,) = list(mode.apply_ready())
    assert applied.lost_step is None if arrive else applied.lost_step == step


def _b_hats(mode: StepEngine, members: list[FakeMember]) -> dict[int, float]:
    """Hand out the next views; the B̂ each one was measured at, by worker."""
    ds = mode.schedule(members)
    measured = mode.meter.monitor.series[-len(ds) :]  # one point per view (stride 1)
    return {d.worker: b for d, (_, b) in zip(ds, measured, strict=True)}


# step 0: every worker sends (1, 1, 1): buf = (1, 1, 1), x1 = -0.1 (1, 1, 1).
# step 1: workers 0, 1 send g0, g1; worker 2's g2 is lost.
G0, G1, G2 = _g(1, 0, 0), _g(0, 2, 0), _g(0, 0, 3)
X1 = -LR * ONES
# x* applies the full mean (1, 2, 3) / 3 with buf* = 0.5 (1, 1, 1) + (1, 2, 3) / 3
X_STAR = X1 - LR * (MU * ONES + _g(1, 2, 3) / 3)


def _run_lossy(policy: str) -> tuple[StepEngine, list[FakeMember], dict[int, float]]:
    mode = _engine(policy)
    members = [FakeMember(i) for i in range(3)]
    _step(mode, members, 0, {i: ONES.clone() for i in range(3)}, {})
    assert torch.allclose(mode.model.x, X1)
    _step(mode, members, 1, {0: G0, 1: G1}, {2: G2})
    assert mode.shadow is not None and torch.allclose(mode.shadow.x, X_STAR)
    return mode, members, _b_hats(mode, members)


def test_zero_fill_applies_the_arrived_sum_over_all_expected() -> None:
    mode, _, b = _run_lossy("zero_fill")
    x2 = X1 - LR * (MU * ONES + (G0 + G1) / 3)
    assert torch.allclose(mode.model.x, x2)
    # every view is x: B̂ = ||x* - x|| / lr = ||(0, 0, -1)|| (the lost share, whole)
    assert b == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0})


def test_reaverage_applies_the_mean_of_what_arrived() -> None:
    mode, _, b = _run_lossy("reaverage")
    x2 = X1 - LR * (MU * ONES + (G0 + G1) / 2)
    assert torch.allclose(mode.model.x, x2)
    # (x* - x) / lr = (1/6, 1/3, -1) for every view
    assert b == pytest.approx({w: (1 / 36 + 1 / 9 + 1) ** 0.5 for w in range(3)})


def test_own_views_substitute_each_workers_own_gradient() -> None:
    mode, members, b = _run_lossy("own")
    x2 = X1 - LR * (MU * ONES + (G0 + G1) / 2)
    assert torch.allclose(mode.model.x, x2)  # the model of record re-averages
    # worker i's view: x1 stepped with (g0 + g1 + g_i) / 3 on the pre-step momentum
    v0 = X1 - LR * (MU * ONES + (G0 + G1 + G0) / 3)
    v1 = X1 - LR * (MU * ONES + (G0 + G1 + G1) / 3)
    views = {w: mode.worker_view(w, 2) for w in range(3)}
    assert views[0][0] == ("own", 2, 0) and torch.allclose(views[0][1], v0)
    assert views[1][0] == ("own", 2, 1) and torch.allclose(views[1][1], v1)
    assert views[2][0] == ("x", 2) and torch.allclose(views[2][1], x2)  # its own was lost
    # (x* - v) / lr: (1/3, 0, -1), (0, 2/3, -1), and the record's (1/6, 1/3, -1)
    assert b == pytest.approx(
        {0: (1 / 9 + 1) ** 0.5, 1: (4 / 9 + 1) ** 0.5, 2: (1 / 36 + 1 / 9 + 1) ** 0.5}
    )
    # the mean of the arrived workers' views is the model of record
    assert torch.allclose((v0 + v1) / 2, x2)
    # a step that loses nothing: every view is x again, measured against x* (the gap stays)
    for wid in range(3):
        mode.on_reply(members[wid], _reply(wid, 2, ONES), ONES)
    list(mode.apply_ready())
    assert mode.own_views == {}
    assert mode.worker_view(0, 3)[0] == ("x", 3)


def test_the_shadow_carries_the_lost_share_in_its_momentum() -> None:
    mode, members, _ = _run_lossy("zero_fill")
    for wid in range(3):  # step 2: nothing lost, (1, 1, 1) from everyone
        mode.on_reply(members[wid], _reply(wid, 2, ONES), ONES)
    list(mode.apply_ready())
    buf_zf = MU * ONES + (G0 + G1) / 3
    buf_star = MU * ONES + _g(1, 2, 3) / 3
    x3 = X1 - LR * buf_zf - LR * (MU * buf_zf + ONES)
    x3_star = X_STAR - LR * (MU * buf_star + ONES)
    assert mode.shadow is not None and torch.allclose(mode.shadow.x, x3_star)
    (b,) = set(_b_hats(mode, members).values())
    # (x* - x) / lr = (buf_zf - buf*) + mu (buf_zf - buf*) = 1.5 (0, 0, -1)
    assert b == pytest.approx(float(((x3_star - x3) / LR).norm())) and b == pytest.approx(1.5)


@pytest.mark.parametrize("policy", ["zero_fill", "reaverage", "own"])
def test_a_step_whose_every_gradient_was_lost(policy: str) -> None:
    mode = _engine(policy, workers=2)
    members = [FakeMember(i) for i in range(2)]
    _step(mode, members, 0, {0: ONES.clone(), 1: ONES.clone()}, {})
    assert [d.step for d in mode.schedule(members)] == [1, 1]
    for wid, g in ((0, _g(2, 0, 0)), (1, _g(0, 2, 0))):
        assert mode.on_lost(members[wid], _reply(wid, 1, g), g)
    (applied,) = list(mode.apply_ready())
    assert applied.lost_step == 1 and applied.loss != applied.loss  # nan: no loss arrived
    assert mode.step == 2
    # a zero gradient under every policy: momentum goes on, x2 = x1 - lr mu buf1
    assert torch.allclose(mode.model.x, X1 - LR * MU * ONES)
    assert mode.norms.all_lost_steps == 1 and mode.norms.lost_fraction_sum == 0.0
    assert mode.shadow is not None
    assert torch.allclose(mode.shadow.x, X1 - LR * (MU * ONES + _g(1, 1, 0)))


def test_no_shadow_until_a_gradient_is_lost() -> None:
    mode = _engine("own")
    members = [FakeMember(i) for i in range(3)]
    _step(mode, members, 0, {i: ONES.clone() for i in range(3)}, {})
    assert mode.shadow is None and set(_b_hats(mode, members).values()) == {0.0}


def test_divisor_per_policy() -> None:
    assert divisor("zero_fill", 3, 1) == 4
    assert divisor("reaverage", 3, 1) == 3 and divisor("own", 3, 1) == 3
    assert divisor("reaverage", 0, 2) == 1  # never divides by zero


def test_own_views_and_shadow_leave_the_optimizer_alone() -> None:
    opt = RecordOptimizer(OptimizerSpec(lr=LR, momentum=MU), torch.zeros(3))
    opt.step(ONES)
    x, before = opt.x.clone(), opt.state_dict()
    buf = before["optimizer"]["state"][0]["momentum_buffer"]
    views = own_views(opt, opt.snapshot(), G0 + G1, {0: G0, 1: G1}, lost=1)
    assert torch.allclose(views[0], x - LR * (MU * ONES + (2 * G0 + G1) / 3))
    shadow = ShadowModel(opt)
    shadow.apply([G0, G1, G2], 3)
    assert torch.equal(opt.x, x)
    assert torch.equal(opt.opt.state[opt.params[0]]["momentum_buffer"], buf)
    assert torch.allclose(shadow.x, x - LR * (MU * ONES + (G0 + G1 + G2) / 3))


@pytest.mark.parametrize(("old", "new"), [("skip", "zero_fill"), ("substitute", "reaverage")])
def test_old_policy_names_are_refused_with_the_new_one(old: str, new: str) -> None:
    with pytest.raises(SpecError, match=f"renamed: use '{new}'"):
        parse_spec({"steps": 1, "missing_policy": old})


def test_a_provisional_view_is_measured_against_x_star_of_its_step() -> None:
    spec = parse_spec(
        {
            "steps": 10,
            "workers": 3,
            # provisional views: the straggler-tolerant mode (half the others suffice)
            "mode": {"name": "straggler", "beta": 0.5, "max_lag": 2},
            "optimizer": {"lr": LR},
        }
    )
    record = ModelOfRecord(RecordOptimizer(spec.optimizer, torch.zeros(3)))
    mode = make_mode(
        ModeContext(spec, 10, record, Meter(ConsistencyMonitor(), False, 1), ObservedNorms())
    )
    assert isinstance(mode, StepEngine)
    members = [FakeMember(i) for i in range(3)]
    for w in range(3):
        mode.join(w)
    mode.schedule(members)
    for wid, g in ((0, G0), (1, G1)):
        mode.on_reply(members[wid], _reply(wid, 0, g), g)
    ahead = mode.schedule(members)  # workers 0 and 1 start step 1 on x0 + (g0 + g1) / 3
    assert [d.step for d in ahead] == [1, 1]
    views_before = mode.meter.monitor.count
    mode.on_lost(members[2], _reply(2, 0, G2), G2)
    list(mode.apply_ready())
    # x*_1 = -lr (g0 + g1 + g2) / 3: each view misses g2 / 3, ||(0, 0, 1)|| = 1
    assert mode.meter.monitor.count == views_before + 2
    assert [b for _, b in mode.meter.monitor.series[-2:]] == pytest.approx([1.0, 1.0])
