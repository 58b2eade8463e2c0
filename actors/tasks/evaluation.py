"""The coordinator's evaluation of a task: loss and metrics over its evaluation set.

The model is put in ``eval()`` mode (dropout off, BatchNorm on its running statistics) and
run under ``torch.no_grad()``; the evaluation set goes through a ``DataLoader`` in the
sampler's plain order with the task's ``collate``. Each batch gives ``task.loss`` and
``task.metrics`` as means over it; :func:`~actors.tasks.base.weighted_means` weights them by
the batch's sample count, so each value is the mean over every evaluation sample. The
record's names are ``test_loss`` and ``test_<metric>``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from actors.tasks.base import Task, weighted_means
from actors.tasks.runtime import batch_size_of


@torch.no_grad()
def evaluate_task(
    task: Task, model: nn.Module, data: Dataset[Any], batch_size: int
) -> dict[str, float]:
    """``{"test_loss": ..., "test_<metric>": ...}`` of ``model`` on ``data`` (CPU).

    Args:
        task: gives the loss, the metrics and the collate function.
        model: the evaluation model (left in ``eval()`` mode).
        data: the task's evaluation set.
        batch_size: samples per evaluation batch (the job's training batch: a size the
            task's memory is known to allow).
    """
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=task.collate)
    parts: list[tuple[int, dict[str, float]]] = []
    for batch in loader:
        n = batch_size_of(batch)
        values = {"loss": float(task.loss(model, batch))}
        values.update(task.metrics(model, batch))
        parts.append((n, values))
    means = weighted_means(parts)
    return {f"test_{k}": v for k, v in means.items()}
