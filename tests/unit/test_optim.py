"""Unit tests for actors/optim.py: FlatSGD follows torch.optim.SGD step for step on a
multi-tensor model (every momentum / weight decay / Nesterov combination), ``peek`` is a
pure preview of ``step``, and ``scale`` scales the gradient."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from actors.flat import flatten
from actors.optim import FlatSGD
from core.spec import OptimizerSpec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

# (momentum, weight_decay, nesterov): every combination torch allows (Nesterov needs momentum)
COMBOS = [
    (mom, wd, nest)
    for mom, wd, nest in itertools.product([0.0, 0.9], [0.0, 1e-2], [False, True])
    if not (nest and mom == 0.0)
]
STEPS = 200
RTOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only fight over a loaded machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model() -> nn.Module:
    """Conv + linear layers: several parameter tensors of different shapes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 3, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("momentum", "weight_decay", "nesterov"), COMBOS)
def test_flat_sgd_matches_torch_sgd_on_real_gradients(
    momentum: float, weight_decay: float, nesterov: bool
) -> None:
    spec = OptimizerSpec(lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    ref = _model()
    mine = _model()
    x = flatten(mine)
    assert torch.equal(x, flatten(ref))
    torch_opt = torch.optim.SGD(
        ref.parameters(),
        lr=spec.lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )
    flat_opt = FlatSGD(spec)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        xb = torch.randn(32, 16, generator=gen)
        yb = torch.randint(0, 5, (32,), generator=gen)
        # the reference: plain PyTorch
        torch_opt.zero_grad()
        nn.functional.cross_entropy(ref(xb), yb).backward()
        torch_opt.step()
        # FlatSGD: the gradient computed on its own parameters, flattened in parameters()
        # order (what a worker sends)
        torch.nn.utils.vector_to_parameters(x, mine.parameters())
        mine.zero_grad()
        nn.functional.cross_entropy(mine(xb), yb).backward()
        g = torch.cat([p.grad.reshape(-1) for p in mine.parameters()])  # type: ignore[union-attr]
        flat_opt.step(x, g)
    assert flat_opt.steps == STEPS
    assert _rel(x, flatten(ref)) < RTOL


@pytest.mark.parametrize(("momentum", "weight_decay", "nesterov"), COMBOS)
def test_flat_sgd_matches_torch_sgd_on_a_fixed_gradient_stream(
    momentum: float, weight_decay: float, nesterov: bool
) -> None:
    """The same gradients fed to both (no feedback through the loss): the arithmetic alone,
    per parameter tensor."""
    spec = OptimizerSpec(lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    ref = _model()
    x = flatten(ref)
    torch_opt = torch.optim.SGD(
        ref.parameters(),
        lr=spec.lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )
    flat_opt = FlatSGD(spec)
    gen = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        g = torch.randn(x.numel(), generator=gen)
        offset = 0
        for p in ref.parameters():
            n = p.numel()
            p.grad = g[offset : offset + n].view_as(p).clone()
            offset += n
        torch_opt.step()
        flat_opt.step(x, g)
    want = flatten(ref)
    assert _rel(x, want) < RTOL
    offset = 0
    for p in ref.parameters():  # every tensor, not just the whole vector
        n = p.numel()
        assert _rel(x[offset : offset + n], p.detach().reshape(-1)) < 10 * RTOL
        offset += n


def _warm(spec: OptimizerSpec, x: torch.Tensor, steps: int = 5) -> FlatSGD:
    opt = FlatSGD(spec)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        opt.step(x, torch.randn(x.numel(), generator=gen))
    return opt


@pytest.mark.parametrize("warm_steps", [0, 5])
@pytest.mark.parametrize(("momentum", "weight_decay", "nesterov"), COMBOS)
def test_peek_leaves_state_untouched_and_equals_step(
    momentum: float, weight_decay: float, nesterov: bool, warm_steps: int
) -> None:
    spec = OptimizerSpec(lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    x = torch.randn(300, generator=torch.Generator().manual_seed(4))
    opt = _warm(spec, x, warm_steps)
    g = torch.randn(300, generator=torch.Generator().manual_seed(5))
    x_before, g_before = x.clone(), g.clone()
    buf_before = None if opt.buf is None else opt.buf.clone()
    steps_before = opt.steps

    x_peek, buf_peek = opt.peek(x, g, opt.buf, scale=0.5)

    # nothing changed: x, the gradient, the optimizer's buffer and step count
    assert torch.equal(x, x_before)
    assert torch.equal(g, g_before)
    assert opt.steps == steps_before
    if buf_before is None:
        assert opt.buf is None
    else:
        assert opt.buf is not None and torch.equal(opt.buf, buf_before)
    assert x_peek.data_ptr() != x.data_ptr()

    # and it is what step would do
    opt.step(x, g, scale=0.5)
    torch.testing.assert_close(x_peek, x, rtol=1e-6, atol=1e-7)
    if momentum == 0.0:
        assert buf_peek is None
    else:
        assert buf_peek is not None and opt.buf is not None
        torch.testing.assert_close(buf_peek, opt.buf, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("momentum", "weight_decay", "nesterov"), COMBOS)
def test_chained_peeks_equal_consecutive_steps(
    momentum: float, weight_decay: float, nesterov: bool
) -> None:
    """The elastic view: provisional steps chained through peek's returned buffer."""
    spec = OptimizerSpec(lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    x = torch.randn(100, generator=torch.Generator().manual_seed(6))
    opt = _warm(spec, x, 3)
    gs = [torch.randn(100, generator=torch.Generator().manual_seed(7 + i)) for i in range(4)]
    v, buf = x, opt.buf
    for g in gs:
        v, buf = opt.peek(v, g, buf, scale=0.25)
    for g in gs:
        opt.step(x, g, scale=0.25)
    torch.testing.assert_close(v, x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [0.25, 1.0, 3.0])
@pytest.mark.parametrize(("momentum", "weight_decay", "nesterov"), COMBOS)
def test_scale_multiplies_the_gradient(
    momentum: float, weight_decay: float, nesterov: bool, scale: float
) -> None:
    spec = OptimizerSpec(lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    x0 = torch.randn(200, generator=torch.Generator().manual_seed(8))
    a, b = x0.clone(), x0.clone()
    opt_a, opt_b = FlatSGD(spec), FlatSGD(spec)
    gen = torch.Generator().manual_seed(9)
    for _ in range(20):
        g = torch.randn(200, generator=gen)
        g_copy = g.clone()
        opt_a.step(a, g, scale=scale)
        assert torch.equal(g, g_copy)  # the caller's gradient (a step sum) is not modified
        opt_b.step(b, g * scale)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_step_returns_the_direction_and_no_momentum_sgd_is_plain() -> None:
    opt = FlatSGD(OptimizerSpec(lr=0.5))
    x = torch.tensor([1.0, -2.0])
    d = opt.step(x, torch.tensor([2.0, 4.0]), scale=0.5)
    assert torch.equal(d, torch.tensor([1.0, 2.0]))
    assert torch.equal(x, torch.tensor([0.5, -3.0]))


def test_state_dict_round_trip_continues_identically() -> None:
    spec = OptimizerSpec(lr=0.05, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(50, generator=torch.Generator().manual_seed(10))
    opt = _warm(spec, x, 4)
    clone = FlatSGD(spec)
    clone.load_state_dict(opt.state_dict())
    assert clone.steps == 4
    y = x.clone()
    g = torch.randn(50, generator=torch.Generator().manual_seed(11))
    opt.step(x, g)
    clone.step(y, g)
    assert torch.equal(x, y)


@pytest.mark.parametrize(("momentum", "weight_decay", "nesterov"), COMBOS)
def test_block_wise_application_equals_the_whole_vector_step(
    momentum: float, weight_decay: float, nesterov: bool
) -> None:
    """Applying each block's slice of a step (blocks in any order across steps, each block's
    steps in order) gives the same x and momentum buffer as whole-vector steps."""
    spec = OptimizerSpec(lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    gen = torch.Generator().manual_seed(7)
    blocks = [(0, 5), (5, 6), (6, 20), (20, 23)]
    x0 = torch.randn(23, generator=gen)
    grads = [torch.randn(23, generator=gen) for _ in range(12)]
    whole, block = FlatSGD(spec), FlatSGD(spec)
    xw, xb = x0.clone(), x0.clone()
    for g in grads:
        whole.step(xw, g, scale=0.25)
    # block b runs ahead of block b+1 by a different amount: a skewed but per-block order
    done = [0] * len(blocks)
    order = torch.randperm(len(blocks) * len(grads), generator=gen).tolist()
    queue = [i % len(blocks) for i in order]
    for b in queue:
        lo, hi = blocks[b]
        block.step_slice(xb, grads[done[b]][lo:hi], lo, hi, scale=0.25)
        done[b] += 1
    assert done == [len(grads)] * len(blocks)
    assert torch.allclose(xb, xw, rtol=0, atol=1e-6), float((xb - xw).abs().max())
    if momentum:
        assert whole.buf is not None and block.buf is not None
        assert torch.allclose(block.buf, whole.buf, rtol=0, atol=1e-6)
    assert float((xw - x0).norm()) > 0.1  # the steps moved x: agreement means something
