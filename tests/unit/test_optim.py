"""Unit tests for actors/optim.py: RecordOptimizer's parameters are views of the flat model
of record (``step`` writes through), it follows plain ``torch.optim`` on a module step for
step (SGD, Adam, AdamW; schedules, clipping, parameter groups), per-block steps add up to a
whole step, ``peek`` is a pure preview of ``step``, and ``state_dict`` restores exactly."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from actors.checkpoint import latest_valid, write_checkpoint
from actors.consistency import adam_coordinate_bound
from actors.flat import ParamLayout, flatten
from actors.optim import RecordOptimizer, group_settings
from actors.schedules import warmup_cosine_factor
from core.errors import TrainingFailed
from core.spec import OptimizerSpec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

STEPS = 40
RTOL = 1e-5

SPECS: list[dict[str, Any]] = [
    {"name": "sgd", "lr": 0.05},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": True},
    {"name": "adam", "lr": 0.01, "weight_decay": 1e-3, "betas": (0.8, 0.99)},
    {
        "name": "adamw",
        "lr": 0.01,
        "weight_decay": 0.1,
        "schedule": {"name": "warmup_cosine", "warmup_steps": 5, "min_lr_ratio": 0.1},
        "clip_grad_norm": 0.5,
        "no_decay_bias_and_norm": True,
    },
    {
        "name": "sgd",
        "lr": 0.1,
        "momentum": 0.5,
        "weight_decay": 1e-2,
        "schedule": {"name": "step", "step_size": 7, "gamma": 0.5},
        "param_groups": [{"match": r"^4\.", "lr_scale": 0.5, "weight_decay": 0.0}],
    },
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only fight over a loaded machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model() -> nn.Module:
    """Conv, LayerNorm and linear layers: parameters of several shapes, 1-D ones included."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 3, kernel_size=3, padding=1),
        nn.Flatten(),
        nn.LayerNorm(48),
        nn.Linear(48, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def _reference(spec: OptimizerSpec, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """Plain torch on the module, with groups and schedule written out by hand."""
    decay, no_decay, half = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("4.") and spec.param_groups:
            half.append(p)
        elif spec.no_decay_bias_and_norm and p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay, "lr": spec.lr}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": spec.lr})
    if half:
        groups.insert(0, {"params": half, "weight_decay": 0.0, "lr": spec.lr * 0.5})
    opt: torch.optim.Optimizer
    if spec.name == "sgd":
        opt = torch.optim.SGD(groups, momentum=spec.momentum, nesterov=spec.nesterov)
    elif spec.name == "adam":
        opt = torch.optim.Adam(groups, betas=spec.adam_betas, eps=spec.adam_eps)
    else:
        opt = torch.optim.AdamW(groups)
    sch = spec.schedule
    sched: Any = None
    if sch.name == "warmup_cosine":
        w, r = sch.warmup_steps, sch.min_lr_ratio

        def f(t: int) -> float:
            if t < w:
                return (t + 1) / w
            return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (t - w) / (STEPS - w)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    elif sch.name == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, sch.step_size, sch.gamma)
    return opt, sched


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g)


def _flat_grad(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """The gradient at flat ``x`` on batch ``k`` (computed on a copy of the module)."""
    torch.nn.utils.vector_to_parameters(x.clone(), model.parameters())
    model.zero_grad()
    xb, yb = _batch(k)
    nn.functional.cross_entropy(model(xb), yb).backward()  # type: ignore[no-untyped-call]
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]


def _record(spec: OptimizerSpec, model: nn.Module) -> RecordOptimizer:
    return RecordOptimizer(spec, flatten(model), ParamLayout.of(model), STEPS)


def test_parameters_are_views_of_x_and_step_writes_through() -> None:
    model = _model()
    rec = _record(OptimizerSpec(name="adamw", lr=0.1), model)
    x = rec.x
    for p, (lo, hi) in zip(rec.params, rec.blocks, strict=True):
        assert p.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        assert p.data_ptr() == x[lo:hi].data_ptr()
    for g, (lo, _) in zip(rec.grad_views, rec.blocks, strict=True):
        assert g.data_ptr() == rec.grad[lo:].data_ptr()
    before = x.clone()
    rec.step(torch.ones_like(x))
    assert rec.x is x and not torch.equal(x, before)
    # the change is visible through x and through each parameter alike
    for p, (lo, hi) in zip(rec.params, rec.blocks, strict=True):
        assert torch.equal(p.detach().reshape(-1), x[lo:hi])


@pytest.mark.parametrize("raw", SPECS, ids=lambda s: f"{s['name']}-{s.get('schedule', {})}")
def test_record_optimizer_follows_plain_torch_step_for_step(raw: dict[str, Any]) -> None:
    spec = OptimizerSpec(**raw)
    ref_model, probe = _model(), _model()
    rec = _record(spec, _model())
    opt, sched = _reference(spec, ref_model)
    for k in range(STEPS):
        assert rec.lr == pytest.approx(opt.param_groups[-1]["lr"])
        g = _flat_grad(probe, rec.x, k)
        rec.step(g)
        opt.zero_grad()
        xb, yb = _batch(k)
        nn.functional.cross_entropy(ref_model(xb), yb).backward()  # type: ignore[no-untyped-call]
        if spec.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), spec.clip_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        want = flatten(ref_model)
        assert float((rec.x - want).norm() / want.norm()) < RTOL, k


def test_no_decay_bias_and_norm_and_first_matching_group_win() -> None:
    model = _model()
    spec = OptimizerSpec.model_validate(
        {
            "weight_decay": 0.1,
            "no_decay_bias_and_norm": True,
            "param_groups": [{"match": r"^1\.", "weight_decay": 0.3, "lr_scale": 2.0}],
        }
    )
    layout = ParamLayout.of(model)
    got = dict(zip(layout.names, group_settings(spec, layout), strict=True))
    assert got["1.weight"] == (0.3, 2.0) and got["1.bias"] == (0.3, 2.0)  # the group wins
    assert got["3.weight"] == (0.0, 1.0) and got["3.bias"] == (0.0, 1.0)  # LayerNorm
    assert got["4.weight"] == (0.1, 1.0) and got["4.bias"] == (0.0, 1.0)


def _warm(spec: OptimizerSpec, steps: int = 6) -> tuple[RecordOptimizer, nn.Module]:
    model = _model()
    rec = _record(spec, model)
    for k in range(steps):
        rec.step(_flat_grad(model, rec.x, k))
    return rec, model


@pytest.mark.parametrize("raw", SPECS[1:4], ids=lambda s: s["name"])
def test_peek_previews_steps_without_touching_the_record(raw: dict[str, Any]) -> None:
    spec = OptimizerSpec(**raw)
    rec, model = _warm(spec)
    x0, state0 = rec.x.clone(), rec.state_dict()
    g1, g2 = _flat_grad(model, rec.x, 50), _flat_grad(model, rec.x, 51)
    for _ in range(2):  # the scratch optimizer is reused: the second call is the same
        v = rec.peek([(g1, 0.5), (g2, 1.0)])
        assert torch.equal(rec.x, x0) and rec.steps == state0["steps"]
    twin = rec.clone()
    twin.step(g1, 0.5)
    twin.step(g2, 1.0)
    assert torch.allclose(v, twin.x, rtol=1e-6, atol=1e-7)
    # from a snapshot: the state before the step, whatever happened since
    snap = rec.snapshot()
    rec.step(g2)
    from_snap = rec.peek([(g1, 0.5)], start=snap)
    twin2 = RecordOptimizer(spec, x0.clone(), rec.layout, STEPS)
    twin2.load_state_dict(state0)
    twin2.step(g1, 0.5)
    assert torch.allclose(from_snap, twin2.x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("raw", [SPECS[1], SPECS[2], SPECS[4]], ids=lambda s: s["name"])
def test_block_steps_add_up_to_the_whole_step(raw: dict[str, Any]) -> None:
    spec = OptimizerSpec(**raw)
    whole, model = _warm(spec)
    block = whole.clone()
    g = _flat_grad(model, whole.x, 77)
    unmeasured = whole.clone()
    whole.step(g, 0.25)
    for b, (lo, hi) in reversed(list(enumerate(block.blocks))):  # any order
        norm = block.step_block(b, g[lo:hi], 0.25, block.steps)
        assert norm is not None and norm >= 0.0
        # unmeasured: the same update, no norm (measuring copies the block)
        assert unmeasured.step_block(b, g[lo:hi], 0.25, unmeasured.steps, measure=False) is None
    block.end_step()
    unmeasured.end_step()
    assert torch.allclose(block.x, whole.x, rtol=1e-6, atol=1e-7)
    assert torch.equal(unmeasured.x, block.x)
    assert block.steps == whole.steps and block.lr == whole.lr


def test_a_block_ahead_uses_the_lr_of_its_own_step() -> None:
    spec = OptimizerSpec.model_validate(
        {"lr": 0.1, "schedule": {"name": "step", "step_size": 1, "gamma": 0.5}}
    )
    rec = RecordOptimizer(spec, torch.zeros(2), None, 10)
    rec.step_block(0, torch.ones(2), 1.0, 0)  # step 0 at lr 0.1
    rec.step_block(0, torch.ones(2), 1.0, 1)  # step 1 (ahead of the count) at lr 0.05
    assert torch.allclose(rec.x, torch.full((2,), -0.15))
    assert rec.opt.param_groups[0]["lr"] == pytest.approx(0.1)  # the schedule's own untouched


def test_block_steps_are_refused_with_clipping() -> None:
    rec = RecordOptimizer(OptimizerSpec(clip_grad_norm=1.0), torch.zeros(3))
    with pytest.raises(TrainingFailed, match="clip"):
        rec.step_block(0, torch.ones(3), 1.0, 0)


def test_a_former_flat_sgd_state_is_refused_with_what_to_do() -> None:
    rec = RecordOptimizer(OptimizerSpec(), torch.zeros(3))
    with pytest.raises(TrainingFailed, match=r"predates torch\.optim"):
        rec.load_state_dict({"buf": None, "steps": 3})


def test_clipping_clips_the_averaged_gradient_by_its_global_norm() -> None:
    rec = RecordOptimizer(OptimizerSpec(lr=1.0, clip_grad_norm=2.0), torch.zeros(2))
    g = torch.tensor([30.0, 40.0])
    rec.step_many([g, g], scale=0.5)  # the mean is g, norm 50 -> clipped to 2
    assert torch.allclose(rec.x, -g / 25.0)
    assert torch.equal(g, torch.tensor([30.0, 40.0]))  # the caller's tensor is untouched


@pytest.mark.parametrize("spec", SPECS[:3], ids=["sgd", "sgd-momentum", "adam"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_mean_of_several_gradients_folded_into_the_fused_kernel_matches_scaling_first(
    spec: dict[str, Any], n: int
) -> None:
    """step_many lets the fused kernel divide the sum by n as it reads it (grad_scale):
    the same steps as the sum scaled by 1/n first, to float rounding, and the callers'
    gradients untouched."""
    opt = OptimizerSpec(**spec)
    folded = RecordOptimizer(opt, torch.zeros(1000))
    assert folded.fused, "torch's fused CPU kernel is the path under test"
    first = RecordOptimizer(opt, torch.zeros(1000))
    gen = torch.Generator().manual_seed(n)
    for _ in range(10):
        grads = [torch.randn(1000, generator=gen) for _ in range(n)]
        kept = [g.clone() for g in grads]
        folded.step_many(grads, scale=1.0 / n)
        first.step(torch.stack(grads).sum(0), scale=1.0 / n)
        assert all(torch.equal(g, k) for g, k in zip(grads, kept, strict=True))
        assert getattr(folded.opt, "grad_scale", None) is None  # not left for other steps
    assert torch.allclose(folded.x, first.x, rtol=1e-6, atol=1e-7)
    assert not torch.equal(folded.x, torch.zeros(1000))


def test_state_dict_round_trip_continues_exactly() -> None:
    spec = OptimizerSpec(**SPECS[3])
    rec, model = _warm(spec)
    saved_x, saved = rec.x.clone(), rec.state_dict()
    other = RecordOptimizer(spec, saved_x.clone(), rec.layout, STEPS)
    other.load_state_dict(saved)
    for k in range(10):
        g = _flat_grad(model, rec.x, 200 + k)
        rec.step(g)
        other.step(g)
        assert torch.equal(rec.x, other.x) and rec.lr == other.lr
    assert saved["scheduler"]["last_epoch"] == 6  # copies: later steps did not change it


def test_rebind_follows_x_into_new_memory() -> None:
    spec = OptimizerSpec(name="sgd", lr=0.1, momentum=0.9)
    rec = RecordOptimizer(spec, torch.zeros(3))
    rec.step(torch.ones(3))
    moved = rec.x.clone()
    rec.rebind(moved)
    rec.step(torch.ones(3))
    assert rec.x is moved
    # buffer 1 then 0.9 + 1: x = -0.1 - 0.19
    assert torch.allclose(moved, torch.full((3,), -0.29))


def test_warmup_cosine_factor_ramps_then_decays_to_the_ratio() -> None:
    f = [warmup_cosine_factor(t, 4, 14, 0.1) for t in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(a > b for a, b in itertools.pairwise(f[4:]))
    assert warmup_cosine_factor(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(10_000, 4, 14, 0.1) == pytest.approx(0.1)  # clamped


def test_adam_coordinate_bound_holds_and_is_reached() -> None:
    """No gradient history takes |m_hat / sqrt(v_hat)| past the bound; the worst history
    (g_s ~ (b1 / b2)^(t - s)) comes within rounding of it."""
    b1, b2, t_end = 0.9, 0.999, 60
    bound = adam_coordinate_bound(b1, b2, t_end)
    assert adam_coordinate_bound(b1, b2, 1) == pytest.approx(1.0)
    assert adam_coordinate_bound(b1, b2, 10**5) == pytest.approx(7.27, abs=0.01)
    g = torch.Generator().manual_seed(0)
    histories = [torch.randn(t_end, generator=g) * torch.rand(t_end, generator=g) ** 4]
    histories.append(torch.tensor([(b1 / b2) ** (t_end - s) for s in range(1, t_end + 1)]))
    ratios = []
    for hist in histories:
        x = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([x], lr=1.0, betas=(b1, b2), eps=0.0)
        for t, gt in enumerate(hist):
            before = x.detach().clone()
            x.grad = gt.reshape(1)
            opt.step()
            ratio = float((before - x.detach()).abs())
            assert ratio <= adam_coordinate_bound(b1, b2, t + 1) * (1 + 1e-5)
        ratios.append(ratio)
    assert ratios[1] == pytest.approx(bound, rel=1e-4)


def test_a_checkpoint_file_restores_optimizer_and_schedule_exactly(tmp_path: Path) -> None:
    """Through actors/checkpoint.py (torch.save, checksum, load): AdamW's moments and step
    counts and the LambdaLR position come back, and the next steps are bit-identical."""
    spec = OptimizerSpec(**SPECS[3])
    rec, model = _warm(spec)
    write_checkpoint(tmp_path, rec.steps, {"x": rec.x.clone(), "opt": rec.state_dict()}, 2)
    loaded = latest_valid(tmp_path)
    assert loaded is not None
    back = RecordOptimizer(spec, loaded.state["x"], rec.layout, STEPS)
    back.load_state_dict(loaded.state["opt"])
    assert back.steps == rec.steps and back.lr == rec.lr
    for k in range(5):
        g = _flat_grad(model, rec.x, 300 + k)
        rec.step(g)
        back.step(g)
        assert torch.equal(rec.x, back.x)


# -- Adam's preconditioner (the missing-gradient terms' unit under Adam) ------------------


def test_precondition_is_adams_next_update_over_lr_when_beta1_is_zero() -> None:
    # with beta1 = 0 Adam's update is -lr g / (sqrt(v_hat) + eps), v updated with g^2 first:
    # precondition(g) must be that update exactly, before the first step and after several
    torch.manual_seed(0)
    layout = ParamLayout(("a", "b"), ((3, 4), (5,)), (0, 12), 17)
    spec = OptimizerSpec(name="adam", lr=0.01, betas=(0.0, 0.99), eps=1e-3)
    opt = RecordOptimizer(spec, torch.randn(17), layout, total_steps=10)
    for k in range(4):
        g = torch.randn(17) * (k + 1)
        pg = opt.precondition(g)
        assert pg is not None
        before = opt.x.clone()
        opt.step(g)
        torch.testing.assert_close((before - opt.x) / 0.01, pg, rtol=1e-4, atol=1e-4)
    # a wrong denominator (no bias correction) would not match: the check can fail
    g = torch.randn(17)
    v = torch.cat([opt.opt.state[p]["exp_avg_sq"].reshape(-1) for p in opt.params])
    wrong = g / ((0.99 * v + 0.01 * g * g).sqrt() + 1e-3)
    pg = opt.precondition(g)
    assert pg is not None and not torch.allclose(pg, wrong, rtol=1e-3)


def test_precondition_is_none_for_sgd_and_leaves_adams_state_alone() -> None:
    sgd = RecordOptimizer(OptimizerSpec(name="sgd", lr=0.1), torch.zeros(4))
    assert sgd.precondition(torch.ones(4)) is None
    adam = RecordOptimizer(OptimizerSpec(name="adamw", lr=0.1), torch.zeros(4))
    adam.step(torch.ones(4))
    state = copy.deepcopy(adam.state_dict())
    adam.precondition(torch.full((4,), 5.0))
    after = adam.state_dict()
    for p in after["optimizer"]["state"]:
        for k, v in after["optimizer"]["state"][p].items():
            assert torch.equal(v, state["optimizer"]["state"][p][k]), k
