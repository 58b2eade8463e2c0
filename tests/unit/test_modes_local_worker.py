"""Unit test of what a worker computes for each mode (no Ray: WorkerCore in-process): one
gradient on the view for ``local_steps = 1``, and for ``local_steps = H`` the sum of the H
gradients along its own plain-SGD trajectory, i.e. ``(view - y_H) / lr``, checked against
the same trajectory run with torch.optim.SGD on a copy of the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from actors.datasets import load_dataset, loss_fn
from actors.flat import flatten, load_flat
from actors.messages import BlockReady, GradientRequest, WorkerInit
from actors.models import build_model
from actors.sampler import ShardSampler
from actors.transport import ShmRef, to_wire
from actors.worker import WorkerCore
from core.spec import JobSpec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

LR = 0.1


def _worker(spec: JobSpec) -> tuple[WorkerCore, np.ndarray]:
    shard = np.arange(200, dtype=np.int64)
    init = WorkerInit(
        worker_id=0,
        spec=spec,
        data_dir=None,
        shard=shard,
        sampler_state=None,
        faults=[],
        t0=0.0,
    )
    return WorkerCore(init), shard


def _reference(
    spec: JobSpec, view: torch.Tensor, shard: np.ndarray, h: int, lr: float = LR
) -> torch.Tensor:
    """``(view - y_H) / lr`` from torch.optim.SGD on the worker's batches, in order."""
    ds = load_dataset(spec.dataset, spec.seed)
    model = build_model(spec.model, ds.n_features, ds.n_outputs, ds.input_shape)
    load_flat(model, view.clone())  # the model gets its own copy: SGD steps it in place
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sampler = ShardSampler(shard, seed=spec.seed, shard_key=0)
    loss = loss_fn(ds.task)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    for _ in range(h):
        idx = torch.from_numpy(sampler.next_batch(spec.batch_size))
        opt.zero_grad()
        loss(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
        opt.step()
    return (view - flatten(model)) / lr


@pytest.mark.parametrize(("h", "local_lr"), [(1, None), (3, None), (3, 0.03)])
def test_a_worker_sends_the_sum_of_its_local_gradients(h: int, local_lr: float | None) -> None:
    """... at the request's ``local_lr`` (the round's scheduled lr) when it gives one."""
    spec = parse_spec(
        {
            "steps": 5,
            "workers": 1,
            "batch_size": 16,
            "optimizer": {"lr": LR},
            "mode": {"name": "local", "local_steps": h},
            "transport": "object_store",
        }
    )
    worker, shard = _worker(spec)
    torch.manual_seed(1)
    view = torch.randn(worker.layout.numel) * 0.1
    req = GradientRequest(step=0, view=to_wire(view, "float32"), local_steps=h, local_lr=local_lr)
    reply = worker.compute(req)
    assert reply.grad is not None and reply.n == h * spec.batch_size
    got = torch.from_numpy(reply.grad)
    want = _reference(spec, view, shard, h, LR if local_lr is None else local_lr)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert reply.raw_norm == pytest.approx(float(got.norm()), rel=1e-6)
    assert reply.sampler_pos["pos"] == (h * spec.batch_size) % shard.size


def test_a_streaming_worker_announces_every_block_as_backward_writes_it(tmp_path: Path) -> None:
    """Per-block elastic on the same-host path: each block lands in the shared-memory slot
    and is announced (last layer first, as backward goes) before the reply; the slot then
    holds exactly the gradient a non-streaming worker sends."""
    spec = parse_spec(
        {
            "steps": 5,
            "workers": 1,
            "batch_size": 16,
            "optimizer": {"lr": LR},
            "mode": {"name": "elastic", "beta": 0.5},
            "model": {"name": "mlp", "hidden": [16, 8]},
        }
    )
    streaming, _ = _worker(spec)
    plain, _ = _worker(spec)
    torch.manual_seed(2)
    view = torch.randn(streaming.layout.numel) * 0.1
    slot = tmp_path / "grad0"
    with open(slot, "wb") as f:
        f.truncate(streaming.layout.numel * 4)  # float32, as the coordinator's pool makes it
    ref = ShmRef(str(slot), streaming.layout.numel)
    frames: list[Any] = []
    streaming.emit = frames.append
    req = GradientRequest(step=3, view=to_wire(view, "float32"), grad_slot=ref, stream_blocks=True)
    reply = streaming.compute(req)
    assert reply.grad_in_slot and reply.grad is None
    blocks = streaming.layout.blocks()
    assert sorted(f.block for f in frames) == list(range(len(blocks)))  # each block once
    assert frames[0].block == len(blocks) - 1  # the read-out's bias: backward starts there
    assert all(isinstance(f, BlockReady) and f.step == 3 and f.worker == 0 for f in frames)
    got = torch.from_file(str(slot), shared=False, size=streaming.layout.numel)
    for f in frames:
        lo, hi = blocks[f.block]
        assert f.norm == pytest.approx(float(got[lo:hi].norm()), rel=1e-6)
    want = plain.compute(GradientRequest(step=3, view=to_wire(view, "float32")))
    assert want.grad is not None
    assert torch.allclose(got, torch.from_numpy(want.grad), atol=1e-6)
    assert float(got.norm()) > 0
