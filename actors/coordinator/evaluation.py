"""The coordinator's evaluation: the model of record (with the workers' averaged buffers)
through the task's evaluation set.

Buffers (docs/tasks.md): each worker keeps its own floating buffers (BatchNorm running
statistics), updated by its forward passes in ``train()`` mode, and sends them with its
replies. The mean of the live workers' latest is what the evaluation model, the saved model,
checkpoints and new workers get (:meth:`Evaluation.mean_buffers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from actors.coordinator.membership import Membership
from actors.flat import load_flat
from actors.modes.base import ModelOfRecord
from actors.tasks.base import Task, TaskContext
from actors.tasks.builtin import BuiltinTask
from actors.tasks.evaluation import evaluate_task
from actors.tasks.loader import job_task
from actors.tasks.runtime import Buffers, dataset_len
from core.spec import JobSpec

# Rows per forward pass when the coordinator evaluates the built-in task (flat rows of a few
# hundred features: 4096 of them are a few MB of activations, and one pass for digits).
BUILTIN_EVAL_BATCH_ROWS = 4096


def open_task(
    spec: JobSpec, data_dir: str | None
) -> tuple[Task, torch.nn.Module, TorchDataset[Any], int]:
    """The coordinator's side of the job's task: the task, the evaluation model (built
    from the seeded RNG, in ``eval()`` mode: dropout off, running statistics used), the
    evaluation set, and the training set's length (it cuts the shards; a map-style dataset
    opens lazily, and the coordinator never reads its samples).

    Raises:
        Exception: whatever the task raises while building its model or data (the job
            fails with the task's own message).
    """
    where = None if data_dir is None else Path(data_dir)
    task = job_task(spec, where)
    torch.manual_seed(spec.seed)
    model = task.build_model()
    model.eval()
    ctx = TaskContext(seed=spec.seed, worker_id=None, data_dir=where, device=torch.device("cpu"))
    n_train = dataset_len(task.train_data(ctx), "train_data")
    return task, model, task.eval_data(ctx), n_train


class Evaluation:
    """See the module docstring.

    Args:
        spec: the job (its batch size sets a user task's evaluation batch).
        task: the job's task.
        net: a model to load the model of record into (kept in ``eval()`` mode).
        eval_set: the task's evaluation set.
        record: the model of record.
        members: the membership (whose buffers count: the live workers').
    """

    def __init__(
        self,
        spec: JobSpec,
        task: Task,
        net: torch.nn.Module,
        eval_set: TorchDataset[Any],
        record: ModelOfRecord,
        members: Membership,
    ) -> None:
        self.spec, self.task, self.net, self.eval_set = spec, task, net, eval_set
        self.record, self.members = record, members
        self.buffer_layout = Buffers.of(net)
        # each live worker's latest floating buffers, and their last mean
        self.worker_buffers: dict[int, np.ndarray] = {}
        self.buffers: np.ndarray | None = self.buffer_layout.read(net)

    def mean_buffers(self) -> np.ndarray | None:
        """The mean of the live workers' latest floating buffers (a model without any:
        ``None``); with no live worker's reply yet, the last mean (or the built model's)."""
        if self.buffers is None:
            return None
        live = [
            self.worker_buffers[w.id] for w in self.members.live() if w.id in self.worker_buffers
        ]
        if live:
            self.buffers = np.mean(np.stack(live), axis=0).astype(np.float32)
        return self.buffers

    def restore(self, buffers: Any) -> None:
        """A checkpoint's averaged buffers become the mean (``None``: it had none)."""
        if buffers is not None:
            self.buffers = np.asarray(buffers, dtype=np.float32).copy()
            self.worker_buffers.clear()  # the workers' own are from after the checkpoint

    def load_model(self) -> None:
        """The evaluation model := the model of record, with the averaged buffers."""
        load_flat(self.net, self.record.x)
        buffers = self.mean_buffers()
        if buffers is not None:
            self.buffer_layout.write(self.net, buffers)

    def metrics(self) -> dict[str, float]:
        """The task's evaluation metrics of the model of record: ``test_loss`` and
        ``test_<metric>`` for each metric, means over the evaluation set."""
        self.load_model()
        # a user's task is evaluated in batches of its training batch (a size its memory is
        # known to allow); the built-in task's rows are small: 4096 per forward pass
        batch = self.spec.batch_size
        if isinstance(self.task, BuiltinTask):
            batch = max(batch, BUILTIN_EVAL_BATCH_ROWS)
        metrics = evaluate_task(self.task, self.net, self.eval_set, batch)
        optimum = self.task.optimum if isinstance(self.task, BuiltinTask) else None
        if optimum is not None:
            metrics["dist_to_optimum"] = float((self.record.x - torch.from_numpy(optimum)).norm())
        return metrics
