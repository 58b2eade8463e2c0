"""Integration: sync mode is exact.

With p workers and per-worker batch b, a sync run ends at the same parameters (to float
tolerance) as plain single-process ``torch.optim.SGD`` with batch p*b on the same samples:
at step k the reference's batch is the concatenation over workers i of worker i's k-th
batch, ``ShardSampler(make_shards(n_train, p, seed)[i], seed, shard_key=i).next_batch(b)``,
and both start from the model built right after ``torch.manual_seed(seed)``.
Checked for p = 1 and p = 4, over both data planes (object store, shared memory).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from integration_helpers import config, final_params, initial_params, run_many

from actors.datasets import load_dataset, loss_fn
from actors.models import build_model
from actors.sampler import ShardSampler, make_shards
from core.spec import JobSpec

pytestmark = pytest.mark.integration

STEPS = 40
BATCH = 16
ATOL = 1e-5


def reference_params(spec: JobSpec) -> torch.Tensor:
    """Plain PyTorch SGD over the workers' concatenated batches."""
    ds = load_dataset(spec.dataset, spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, ds.n_features, ds.n_outputs, ds.input_shape)
    opt = spec.optimizer
    sgd = torch.optim.SGD(
        model.parameters(),
        lr=opt.lr,
        momentum=opt.momentum,
        weight_decay=opt.weight_decay,
        nesterov=opt.nesterov,
    )
    p, b = spec.workers, spec.batch_size
    shards = make_shards(ds.n_train, p, spec.seed)
    samplers = [ShardSampler(shards[i], seed=spec.seed, shard_key=i) for i in range(p)]
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    loss = loss_fn(ds.task)
    assert spec.steps is not None
    for _ in range(spec.steps):
        idx = torch.from_numpy(np.concatenate([s.next_batch(b) for s in samplers]))
        sgd.zero_grad()
        loss(model(x[idx]), y[idx]).backward()
        sgd.step()
    return torch.cat([q.detach().reshape(-1) for q in model.parameters()])


def _spec(workers: int, transport: str) -> JobSpec:
    return config(
        "digits_sync.yaml",
        name=f"exact-p{workers}-{transport.replace('_', '-')}",
        workers=workers,
        steps=STEPS,
        batch_size=BATCH,
        eval_interval=STEPS,
        transport=transport,
    )  # the config's optimizer: lr 0.1, momentum 0.9, weight decay 1e-4


CASES = [(p, t) for t in ("object_store", "shared_memory") for p in (1, 4)]


@pytest.fixture(scope="module")
def finals(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], Path]:
    """All four runs at once (2 x 0.5 + 2 x 1.25 = 3.5 CPUs)."""
    jobs = [(_spec(p, t), tmp_path_factory.mktemp(f"p{p}-{t}")) for p, t in CASES]
    summaries = run_many(jobs)
    for (p, t), s in zip(CASES, summaries, strict=True):
        assert s["state"] == "succeeded", (p, t, s.get("error"))
        assert s["steps"] == STEPS
    return {case: out for case, (_, out) in zip(CASES, jobs, strict=True)}


def test_reference_is_not_trivial() -> None:
    """The reference moves the parameters and depends on p (so agreement means something)."""
    spec1, spec4 = _spec(1, "object_store"), _spec(4, "object_store")
    ds = load_dataset(spec1.dataset, spec1.seed)
    x0 = initial_params(spec1, ds)
    r1, r4 = reference_params(spec1), reference_params(spec4)
    assert float((r1 - x0).norm()) > 1.0
    assert float((r1 - r4).norm()) > 100 * ATOL


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("workers", "transport"), CASES)
def test_sync_matches_single_process_sgd(
    finals: dict[tuple[int, str], Path], workers: int, transport: str
) -> None:
    spec = _spec(workers, transport)
    got = final_params(finals[(workers, transport)])
    want = reference_params(spec)
    assert got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= ATOL, f"max |diff| {err:.3g} > {ATOL} (p={workers}, {transport})"
