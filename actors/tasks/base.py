"""The task interface: what a job trains, brought by the user or built in.

A *task* is one small object that the runtime asks for four things and nothing else:

* :meth:`Task.build_model`: any ``torch.nn.Module`` (parameters, buffers, dropout: all fine).
  The runtime seeds torch's global RNG before calling it, so every process builds the same
  initial weights.
* :meth:`Task.train_data` / :meth:`Task.eval_data`: map-style ``torch.utils.data.Dataset``\\ s
  (``__len__`` and ``__getitem__``). Each worker calls :meth:`Task.train_data` *itself* (with
  its own :class:`TaskContext`) and reads only the indices of its shard through a
  ``DataLoader``; nothing is copied whole through Ray. Open files lazily in
  ``__getitem__`` (or keep an index of offsets), not the whole corpus in ``__init__``, if
  the data is large.
* :meth:`Task.loss`: the mean loss of a batch (a scalar tensor that autograd can
  differentiate); a batch is whatever :meth:`Task.collate` makes of a list of samples
  (``torch.utils.data.default_collate`` unless overridden).
* :meth:`Task.metrics`: evaluation metrics of a batch, as means over the batch; the runtime
  weights them by the batch's sample count, so the reported value is the mean over the
  evaluation set. The evaluation loss is always reported (``test_loss``); each metric ``m``
  as ``test_m``.

A job names its task by import path (``task: {entrypoint: "my_pkg.tasks:build", params:
{...}}``). The entrypoint is a callable (a ``Task`` subclass or a function returning a
``Task``) taking one argument, the params: when that argument is annotated with a pydantic
model, the params are validated into it first (and a bad value is refused with the field's
path under ``task.params``), else the callable gets the plain dict.

A complete task of under 40 lines is in the README ("Bring your own task"), and two
example packages are under ``examples/``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate


@dataclass(frozen=True)
class TaskContext:
    """Where a task's data is being opened.

    Attributes:
        seed: the job's seed (a task that generates or splits data must use it, so every
            process sees the same samples).
        worker_id: the worker's id, or ``None`` in the coordinator (evaluation).
        data_dir: the operator's data directory (``ESGD_DATA_DIR``), if one is set.
        device: where the model runs (``cuda`` when the actor has a GPU, else ``cpu``).
    """

    seed: int
    worker_id: int | None
    data_dir: Path | None
    device: torch.device


class Task(ABC):
    """See the module docstring. Subclass it and implement the abstract methods."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The network to train (float32 parameters; built from torch's seeded RNG)."""

    @abstractmethod
    def train_data(self, ctx: TaskContext) -> Dataset[Any]:
        """The training set (map-style); a worker reads only its shard's indices of it."""

    @abstractmethod
    def eval_data(self, ctx: TaskContext) -> Dataset[Any]:
        """The evaluation set (map-style), read by the coordinator."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The mean loss of ``batch`` under ``model`` (a differentiable scalar)."""

    def metrics(self, model: nn.Module, batch: Any) -> dict[str, float]:  # noqa: ARG002
        """Evaluation metrics of ``batch`` as means over it (none by default)."""
        return {}

    def collate(self, samples: list[Any]) -> Any:
        """Make one batch of a list of samples (``default_collate`` by default)."""
        return default_collate(samples)


def weighted_means(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """The mean of per-batch means, each weighted by its batch's sample count.

    Args:
        parts: ``(samples in the batch, {metric: mean over the batch})`` per batch.

    Returns:
        ``{metric: mean over every sample}``; NaN for a metric no batch had, or no samples.
    """
    total = sum(n for n, _ in parts)
    keys = {k for _, m in parts for k in m}
    if total == 0:
        return dict.fromkeys(keys, math.nan)
    return {k: sum(n * m.get(k, math.nan) for n, m in parts) / total for k in sorted(keys)}
