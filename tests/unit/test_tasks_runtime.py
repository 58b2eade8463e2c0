"""Unit tests of what the runtime wraps around a task (no Ray): the shard's DataLoader keeps
the sampler's exact order and reports the position of the batch *used* even when loader
workers fetch ahead, re-sharding drops what was fetched ahead; buffers (BatchNorm running
statistics) are read, written, sent by a worker and averaged by the coordinator; the
evaluation is in eval mode with weighted means; bfloat16 autocast gives a float32 gradient
close to the float32 one."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from actors.coordinator.evaluation import Evaluation
from actors.flat import flatten
from actors.messages import GradientRequest, WorkerInit
from actors.sampler import ShardSampler
from actors.tasks.base import Task, TaskContext
from actors.tasks.builtin import (
    BuiltinParams,
    BuiltinTask,
    TensorRows,
    cached_dataset,
    prune_cache,
)
from actors.tasks.evaluation import evaluate_task
from actors.tasks.runtime import Buffers, ShardLoader
from actors.transport import to_wire
from actors.worker import WorkerCore
from core.spec import DatasetSpec, JobSpec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

BN_SRC = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from actors.tasks import Task

class BnTask(Task):
    def __init__(self, params: dict) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 6, generator=g) * 3 + 1
        self.y = (self.x[:, 0] > 1).long()
    def build_model(self):
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
                             nn.Dropout(0.1), nn.Linear(16, 2))
    def train_data(self, ctx): return TensorDataset(self.x, self.y)
    def eval_data(self, ctx): return TensorDataset(self.x[:64], self.y[:64])
    def loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])
"""


@pytest.fixture
def bn_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"bntasks_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(textwrap.dedent(BN_SRC))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"{name}:BnTask"
    for m in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[m]


class Rows(Task):
    """A task whose samples are their own index (to see the order of the batches)."""

    def build_model(self) -> nn.Module:
        return nn.Linear(1, 1)

    def train_data(self, ctx: TaskContext) -> TensorDataset:  # noqa: ARG002
        return TensorDataset(torch.arange(50, dtype=torch.int64))

    def eval_data(self, ctx: TaskContext) -> TensorDataset:  # noqa: ARG002
        return TensorDataset(torch.arange(10, dtype=torch.int64))

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(batch[0].float()[:, None]).mean()


def _loader(workers: int, shard: np.ndarray) -> ShardLoader:
    sampler = ShardSampler(shard, seed=3, shard_key=1)
    data = Rows().train_data(TaskContext(0, 1, None, torch.device("cpu")))
    return ShardLoader(Rows(), data, sampler, batch_size=7, loader_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_follows_the_sampler_and_reports_the_batch_used(workers: int) -> None:
    shard = np.arange(3, 40, dtype=np.int64)
    ref = ShardSampler(shard, seed=3, shard_key=1)
    loader = _loader(workers, shard)
    for _ in range(9):  # past an epoch (37 samples), while loader workers fetch ahead
        (got,) = loader.next()
        assert got.tolist() == ref.next_batch(7).tolist()
        assert (loader.sampler.epoch, loader.sampler.pos) == (ref.epoch, ref.pos)
    # a re-shard continues from the batch used, not from what was fetched ahead
    new = np.arange(40, 50, dtype=np.int64)
    loader.sampler.reshard(new)
    loader.restart()
    ref.reshard(new)
    for _ in range(3):
        (got,) = loader.next()
        assert got.tolist() == ref.next_batch(7).tolist()
    # a resume from a saved position gives the same next batch
    state = loader.sampler.state_dict()
    (nxt,) = loader.next()
    loader.restart(ShardSampler.from_state(state))
    (again,) = loader.next()
    assert nxt.tolist() == again.tolist()


def test_buffers_are_the_floating_persistent_ones_and_round_trip() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    layout = Buffers.of(model)
    assert layout.names == ("1.running_mean", "1.running_var")  # not num_batches_tracked
    assert Buffers.of(nn.Linear(3, 4)).read(nn.Linear(3, 4)) is None
    flat = np.arange(8, dtype=np.float32)
    layout.write(model, flat)
    assert np.array_equal(layout.read(model), flat)  # type: ignore[arg-type]
    assert model[1].running_var.tolist() == [4.0, 5.0, 6.0, 7.0]


def _worker(spec: JobSpec, buffers: np.ndarray | None = None) -> WorkerCore:
    init = WorkerInit(
        worker_id=0,
        spec=spec,
        data_dir=None,
        shard=np.arange(128, dtype=np.int64),
        sampler_state=None,
        faults=[],
        t0=0.0,
        buffers=buffers,
    )
    return WorkerCore(init)


def test_a_worker_trains_in_train_mode_and_sends_its_buffers(bn_pkg: str) -> None:
    spec = parse_spec({"steps": 5, "batch_size": 16, "task": {"entrypoint": bn_pkg}})
    w = _worker(spec)
    assert w.model.training
    view = to_wire(flatten(w.model), "float32")
    first = w.compute(GradientRequest(step=0, view=view))
    second = w.compute(GradientRequest(step=1, view=view))
    assert first.buffers is not None and second.buffers is not None
    assert first.buffers.shape == (32,)  # running mean and var of 16 features
    assert not np.array_equal(first.buffers, second.buffers)  # updated by each forward
    # a new worker starts from the averaged buffers it is given
    start = np.full(32, 0.5, dtype=np.float32)
    w2 = _worker(spec, buffers=start)
    assert np.array_equal(w2.buffers.read(w2.model), start)  # type: ignore[arg-type]
    # a model without buffers sends none
    plain = _worker(parse_spec({"steps": 5, "workers": 1}))
    reply = plain.compute(GradientRequest(step=0, view=to_wire(flatten(plain.model), "float32")))
    assert reply.buffers is None


def test_bfloat16_autocast_gives_a_float32_gradient_near_the_float32_one(bn_pkg: str) -> None:
    task = {"entrypoint": bn_pkg}
    full = _worker(parse_spec({"steps": 5, "batch_size": 32, "task": task}))
    half = _worker(
        parse_spec({"steps": 5, "batch_size": 32, "task": task, "precision": "bfloat16"})
    )
    view = flatten(full.model)
    torch.manual_seed(1)  # the same dropout masks for both
    g32, _, _ = full._batch_grads(view.clone())
    torch.manual_seed(1)
    g16, _, _ = half._batch_grads(view.clone())
    assert all(b.dtype == torch.float32 for b in g16)
    a, b = torch.cat([g.reshape(-1) for g in g32]), torch.cat([g.reshape(-1) for g in g16])
    # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%) per operation
    assert float((a - b).norm() / a.norm()) < 0.1
    assert not torch.equal(a, b)  # autocast was on


class _Live:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def live(self) -> list[Any]:
        return [type("W", (), {"id": i})() for i in self.ids]


def test_the_coordinator_averages_the_live_workers_latest_buffers() -> None:
    t = object.__new__(Evaluation)  # only the buffer bookkeeping is exercised
    t.buffers = np.zeros(2, dtype=np.float32)
    t.worker_buffers = {0: np.array([1.0, 2.0]), 1: np.array([3.0, 6.0]), 2: np.array([9.0, 9.0])}
    t.members = _Live([0, 1])  # type: ignore[assignment]
    assert t.mean_buffers().tolist() == [2.0, 4.0]  # type: ignore[union-attr]
    t.members = _Live([])  # type: ignore[assignment]
    assert t.mean_buffers().tolist() == [2.0, 4.0]  # type: ignore[union-attr]  # kept
    t.restore(np.array([5.0, 5.0]))  # a checkpoint's mean; the workers' own are older
    assert t.mean_buffers().tolist() == [5.0, 5.0] and not t.worker_buffers  # type: ignore[union-attr]


def test_evaluation_is_in_eval_mode_with_means_weighted_by_batch_size() -> None:
    ds = DatasetSpec(name="digits")
    task = BuiltinTask(BuiltinParams(dataset=ds))
    ctx = TaskContext(0, None, None, torch.device("cpu"))
    data = task.eval_data(ctx)
    torch.manual_seed(0)
    model = task.build_model()
    model.train()
    out = evaluate_task(task, model, data, batch_size=50)  # 360 rows: the last batch is 10
    assert not model.training
    x, y = torch.from_numpy(np.array(data.x)), torch.from_numpy(np.array(data.y))
    with torch.no_grad():
        logits = model(x)
    # exactly k / n, as the model file's reader computes it (no float32 rounding)
    assert out["test_accuracy"] == int((logits.argmax(1) == y).sum()) / len(y)
    ref = float(nn.functional.cross_entropy(logits, y))
    assert out["test_loss"] == pytest.approx(ref, rel=1e-5)
    assert isinstance(data, TensorRows) and len(data) == 360


def test_the_builtin_dataset_is_cached_per_host_and_memory_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = DatasetSpec(name="least_squares", n_samples=300, n_features=5)
    first = cached_dataset(spec, 3, None, tmp_path)  # loads, and leaves the arrays
    (entry,) = list(tmp_path.iterdir())
    second = cached_dataset(spec, 3, None, tmp_path)
    assert isinstance(second.x_train, np.memmap)
    for k in ("x_train", "y_train", "x_test", "y_test", "optimum"):
        assert np.array_equal(getattr(first, k), getattr(second, k)), k
    assert (second.n_features, second.n_outputs, second.task) == (5, 1, "regression")
    # another seed is another entry; a dataset over the cache's bound is not cached
    cached_dataset(spec, 4, None, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    monkeypatch.setattr("actors.tasks.builtin.MAX_CACHE_BYTES", 1000)
    cached_dataset(spec, 5, None, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2 and entry.is_dir()


def test_the_dataset_cache_is_pruned_oldest_used_first_and_by_age(tmp_path: Path) -> None:
    spec = DatasetSpec(name="least_squares", n_samples=300, n_features=5)
    for seed in (1, 2, 3):
        cached_dataset(spec, seed, None, tmp_path)
    entries = sorted(tmp_path.iterdir(), key=lambda d: (d / "meta.json").stat().st_mtime)
    size = sum(f.stat().st_size for f in entries[0].iterdir())
    now = time.time()
    for i, d in enumerate(entries):  # used 30, 20, 10 s ago; then seed 1's is read again
        os.utime(d / "meta.json", (now - 30 + 10 * i, now - 30 + 10 * i))
    first = entries[0]
    cached_dataset(spec, 1, None, tmp_path)  # a hit: now the most recently used
    half_written = tmp_path / "abc.tmp"
    half_written.mkdir()
    os.utime(half_written, (now - 7200, now - 7200))
    # room for two: the least recently used (seed 2's) goes, the one just read stays
    gone = prune_cache(tmp_path, max_bytes=2 * size + 10)
    assert gone == [entries[1].name] and first.is_dir() and not half_written.exists()
    # unused for longer than the age limit: gone whatever the room, but never ``keep``
    assert prune_cache(tmp_path, keep=first.name, max_age_s=5.0) == [entries[2].name]
    assert [d.name for d in tmp_path.iterdir()] == [first.name]
