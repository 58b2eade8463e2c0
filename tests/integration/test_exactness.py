"""Integration: sync mode is exact.

With p workers and per-worker batch b, a sync run ends at the same parameters (to float
tolerance) as plain single-process PyTorch with batch p*b on the same samples: with
``torch.optim.SGD`` (momentum, weight decay), and with ``torch.optim.AdamW`` + linear
warm-up / cosine (``LambdaLR``) + clipping by global norm (``clip_grad_norm_``), the
schedule's formula written out here, not imported:
at step k the reference's batch is the concatenation over workers i of worker i's k-th
batch, ``ShardSampler(make_shards(n_train, p, seed)[i], seed, shard_key=i).next_batch(b)``,
and both start from the model built right after ``torch.manual_seed(seed)``.
Checked for p = 1 and p = 4, over both data planes (object store, shared memory) for
SGD, and over shared memory for AdamW.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

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


def _reference_optimizer(spec: JobSpec, model: torch.nn.Module) -> tuple[Any, Any]:
    """The spec's optimizer and schedule, built with plain torch."""
    opt = spec.optimizer
    if opt.name == "sgd":
        sgd = torch.optim.SGD(
            model.parameters(),
            lr=opt.lr,
            momentum=opt.momentum,
            weight_decay=opt.weight_decay,
            nesterov=opt.nesterov,
        )
        return sgd, None
    assert opt.name == "adamw" and opt.schedule.name == "warmup_cosine"
    adamw = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    w, r, t_end = opt.schedule.warmup_steps, opt.schedule.min_lr_ratio, spec.steps
    assert t_end is not None

    def factor(t: int) -> float:  # linear warm-up, then cosine to the last step
        if t < w:
            return (t + 1) / w
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (t - w) / (t_end - w)))

    return adamw, torch.optim.lr_scheduler.LambdaLR(adamw, factor)


def reference_run(spec: JobSpec) -> tuple[torch.Tensor, int]:
    """Plain PyTorch over the workers' concatenated batches: the final parameters, and how
    many steps the clip shortened the gradient."""
    ds = load_dataset(spec.dataset, spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, ds.n_features, ds.n_outputs, ds.input_shape)
    opt, sched = _reference_optimizer(spec, model)
    clip = spec.optimizer.clip_grad_norm
    p, b = spec.workers, spec.batch_size
    shards = make_shards(ds.n_train, p, spec.seed)
    samplers = [ShardSampler(shards[i], seed=spec.seed, shard_key=i) for i in range(p)]
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    loss = loss_fn(ds.task)
    assert spec.steps is not None
    clipped = 0
    for _ in range(spec.steps):
        idx = torch.from_numpy(np.concatenate([s.next_batch(b) for s in samplers]))
        opt.zero_grad()
        loss(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
        if clip is not None:
            clipped += int(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)) > clip)
        opt.step()
        if sched is not None:
            sched.step()
    return torch.cat([q.detach().reshape(-1) for q in model.parameters()]), clipped


def reference_params(spec: JobSpec) -> torch.Tensor:
    """The final parameters of :func:`reference_run`."""
    return reference_run(spec)[0]


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
ADAMW: dict[str, Any] = {
    "name": "adamw",
    "lr": 0.01,
    "weight_decay": 0.05,
    # 8 warm-up steps of 40, then cosine down to a tenth
    "schedule": {"name": "warmup_cosine", "warmup_steps": 8, "min_lr_ratio": 0.1},
    # within the digits MLP's gradient norms here (the clip shortens 27 of the 40 steps)
    "clip_grad_norm": 1.0,
    "momentum": 0.0,  # the base config's SGD momentum, merged in: off (refused otherwise)
}


def _adamw_spec(workers: int) -> JobSpec:
    return config(
        "digits_sync.yaml",
        name=f"exact-adamw-p{workers}",
        workers=workers,
        steps=STEPS,
        batch_size=BATCH,
        eval_interval=STEPS,
        transport="shared_memory",
        optimizer=ADAMW,
    )


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[int, str], tuple[Path, dict[str, Any]]]:
    """All four runs at once (2 x 0.5 + 2 x 1.25 = 3.5 CPUs): folder and summary."""
    jobs = [(_spec(p, t), tmp_path_factory.mktemp(f"p{p}-{t}")) for p, t in CASES]
    summaries = run_many(jobs)
    for (p, t), s in zip(CASES, summaries, strict=True):
        assert s["state"] == "succeeded", (p, t, s.get("error"))
        assert s["steps"] == STEPS
    return {case: (out, s) for case, (_, out), s in zip(CASES, jobs, summaries, strict=True)}


@pytest.fixture(scope="module")
def finals(
    runs: dict[tuple[int, str], tuple[Path, dict[str, Any]]],
) -> dict[tuple[int, str], Path]:
    return {case: out for case, (out, _) in runs.items()}


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


@pytest.mark.timeout(900)
def test_sync_updates_run_on_the_cores_of_the_workers_waiting_for_them(
    runs: dict[tuple[int, str], tuple[Path, dict[str, Any]]],
) -> None:
    """Training.apply_threads on real actors: the coordinator (one thread of its own, as
    Ray gives a fractional-CPU actor) applies a sync update on the cores of the waiting
    workers of its host; workers reached through the object store lend none (the
    exactness above holds either way)."""
    cores = len(os.sched_getaffinity(0))
    threads = {case: s["timing"]["apply_threads"] for case, (_, s) in runs.items()}
    assert threads[(4, "shared_memory")] == min(cores, 5), threads
    assert threads[(1, "shared_memory")] == min(cores, 2), threads
    assert threads[(4, "object_store")] == 1, threads


@pytest.fixture(scope="module")
def adamw_finals(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Both AdamW runs at once (0.5 + 1.25 CPUs)."""
    jobs = [(_adamw_spec(p), tmp_path_factory.mktemp(f"adamw-p{p}")) for p in (1, 4)]
    for (spec, _), s in zip(jobs, run_many(jobs), strict=True):
        assert s["state"] == "succeeded", (spec.workers, s.get("error"))
        assert s["steps"] == STEPS
    return {spec.workers: out for spec, out in jobs}


def test_adamw_reference_is_not_trivial() -> None:
    """The AdamW reference clips some steps but not all, and depends on p."""
    r1, clipped = reference_run(_adamw_spec(1))
    r4, _ = reference_run(_adamw_spec(4))
    assert 0 < clipped < STEPS, clipped
    assert float((r1 - r4).norm()) > 100 * ATOL


@pytest.mark.timeout(900)
@pytest.mark.parametrize("workers", [1, 4])
def test_sync_adamw_warmup_cosine_clipping_matches_single_process(
    adamw_finals: dict[int, Path], workers: int
) -> None:
    spec = _adamw_spec(workers)
    got = final_params(adamw_finals[workers])
    want = reference_params(spec)
    assert got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= ATOL, f"max |diff| {err:.3g} > {ATOL} (AdamW, p={workers})"
