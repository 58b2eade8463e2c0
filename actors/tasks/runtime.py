"""What the runtime wraps around a task: batches of a shard, the loss on a flat view, buffers.

* :class:`ShardBatches` drives a ``torch.utils.data.DataLoader`` (as its ``batch_sampler``)
  from the worker's seeded :class:`~actors.sampler.ShardSampler`, and remembers the
  sampler's position after each batch it hands out. A loader with worker processes asks for
  batches ahead of their use; :class:`ShardLoader` pairs each batch with *its* position
  (first in, first out: the loader keeps the order), so the position a reply reports is
  that of the batch the gradient was computed on, and a resume or a re-shard continues
  from there (the batches fetched ahead are discarded, never skipped).
* :class:`LossOf` is the module that ``torch.func.functional_call`` runs: its forward is
  ``task.loss(model, batch)``, with the model's parameters replaced by pieces of a view.
* :class:`Buffers`: the model's floating persistent buffers (BatchNorm running statistics)
  as one flat float32 vector, read and written (docs/tasks.md: buffers are per worker, the
  coordinator averages the live workers' latest ones).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset

from actors.sampler import ShardSampler
from actors.tasks.base import Task
from core.errors import ElasticSGDError


@dataclass(frozen=True)
class Position:
    """A sampler's position after a batch (what a reply reports and a checkpoint keeps)."""

    epoch: int
    pos: int
    samples_seen: int


class ShardBatches:
    """An endless batch sampler over a copy of ``sampler`` (see the module docstring).

    Args:
        sampler: where to start; it is not advanced (the loader's copy is).
        batch_size: samples per batch.
    """

    def __init__(self, sampler: ShardSampler, batch_size: int) -> None:
        self.start = sampler.state_dict()
        self.batch_size = batch_size
        self.positions: deque[Position] = deque()

    def __iter__(self) -> Iterator[list[int]]:
        s = ShardSampler.from_state(self.start)
        while True:
            idx = s.next_batch(self.batch_size)
            self.positions.append(Position(s.epoch, s.pos, s.samples_seen))
            yield idx.tolist()


class ShardLoader:
    """Batches of one worker's shard, in the sampler's order, through a ``DataLoader``.

    Args:
        task: gives ``collate``.
        data: the task's training set (map-style).
        sampler: the worker's sampler: it always holds the position of the last batch
            *used* (:meth:`next` moves it), whatever the loader fetched ahead.
        batch_size: samples per batch.
        loader_workers: the DataLoader's worker processes (0: in this process).
        pin_memory: pin batches (a CUDA worker).
    """

    def __init__(
        self,
        task: Task,
        data: Dataset[Any],
        sampler: ShardSampler,
        batch_size: int,
        loader_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.task, self.data, self.sampler = task, data, sampler
        self.batch_size = batch_size
        self.loader_workers = loader_workers
        self.pin_memory = pin_memory
        self._batches: ShardBatches | None = None
        self._it: Iterator[Any] | None = None

    def _start(self) -> Iterator[Any]:
        self._batches = ShardBatches(self.sampler, self.batch_size)
        loader = DataLoader(
            self.data,
            batch_sampler=self._batches,
            collate_fn=self.task.collate,
            num_workers=self.loader_workers,
            pin_memory=self.pin_memory,
            # 2 batches ahead per loader worker (torch's default), the fewest that overlap
            prefetch_factor=2 if self.loader_workers > 0 else None,
        )
        return iter(loader)

    def next(self) -> Any:
        """The next batch; the sampler moves to the position after it."""
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        assert self._batches is not None
        p = self._batches.positions.popleft()
        self.sampler.epoch, self.sampler.pos, self.sampler.samples_seen = (
            p.epoch,
            p.pos,
            p.samples_seen,
        )
        return batch

    def restart(self, sampler: ShardSampler | None = None) -> None:
        """Drop what was fetched ahead; the next batch follows ``sampler`` (default: the
        current one, e.g. after :meth:`ShardSampler.reshard`)."""
        if sampler is not None:
            self.sampler = sampler
        self._it, self._batches = None, None


class TaskDataError(ElasticSGDError, TypeError):
    """A task's data is not a map-style dataset with a length."""


def dataset_len(data: Dataset[Any], what: str) -> int:
    """The length of a task's dataset.

    Raises:
        TaskDataError: it has no ``__len__`` (the task must give a map-style dataset).
    """
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise TaskDataError(
            f"the task's {what} returned {type(data).__name__}, which has no __len__: give a "
            "map-style torch.utils.data.Dataset (__len__ and __getitem__)"
        ) from None
    if n < 1:
        raise TaskDataError(f"the task's {what} is empty; it must hold at least one sample")
    return int(n)


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of ``batch`` (any nesting of lists, tuples, dicts) on ``device``."""
    if device.type == "cpu":
        return batch
    return tree_map(
        lambda t: t.to(device, non_blocking=True) if isinstance(t, Tensor) else t, batch
    )


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (1 if it has none)."""
    leaves: list[int] = []

    def see(t: Any) -> Any:
        if isinstance(t, Tensor) and t.dim() > 0 and not leaves:
            leaves.append(int(t.shape[0]))
        return t

    tree_map(see, batch)
    return leaves[0] if leaves else 1


class LossOf(nn.Module):
    """``forward(batch) = task.loss(model, batch)``, for ``functional_call`` (parameters of
    ``model`` are named ``model.<name>`` here)."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Any) -> Tensor:
        return self.task.loss(self.model, batch)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to bfloat16 on ``device`` when the job asks for it, else nothing."""
    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Buffers:
    """The floating persistent buffers of a module, in ``state_dict`` order.

    Integer buffers (BatchNorm's ``num_batches_tracked``) stay each process's own: they are
    counters, not statistics, and matter only to a BatchNorm without a momentum.
    """

    names: tuple[str, ...]
    numel: int

    @classmethod
    def of(cls, module: nn.Module) -> Buffers:
        params = {n for n, _ in module.named_parameters()}
        names, n = [], 0
        for name, t in module.state_dict().items():
            if name not in params and isinstance(t, Tensor) and t.is_floating_point():
                names.append(name)
                n += t.numel()
        return cls(tuple(names), n)

    def read(self, module: nn.Module) -> np.ndarray | None:
        """The buffers as one float32 vector (``None``: the module has none)."""
        if not self.names:
            return None
        sd = module.state_dict()
        return torch.cat([sd[n].detach().reshape(-1).float().cpu() for n in self.names]).numpy()

    def write(self, module: nn.Module, flat: np.ndarray) -> None:
        """Copy a vector from :meth:`read` (of a module of the same task) into ``module``."""
        if not self.names:
            return
        sd = module.state_dict()
        src = torch.from_numpy(np.asarray(flat, dtype=np.float32))
        off = 0
        with torch.no_grad():
            for n in self.names:
                t = sd[n]
                k = t.numel()
                t.copy_(src[off : off + k].view(t.shape).to(t.dtype))
                off += k
