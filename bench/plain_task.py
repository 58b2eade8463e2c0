"""The plain-PyTorch reference for any task: what one process trains on the same samples.

Given a job (its ``task``, ``seed``, ``workers`` p, ``batch_size`` b, ``steps`` and
``optimizer``), :func:`train_plain` trains the task's model in this process the way a user
would without elastic-sgd, and the way a synchronous elastic-sgd job does to float
tolerance:

* the same initial weights: ``torch.manual_seed(seed)`` right before ``build_model``, as
  the coordinator does;
* the same samples in the same order: step k's batch is the concatenation over workers
  ``i = 0..p-1`` of worker i's k-th batch,
  ``ShardSampler(make_shards(n_train, p, seed)[i], seed, shard_key=i).next_batch(b)``
  (:mod:`actors.sampler`, what a worker draws when the job starts with p workers and is
  never resized), read from ``task.train_data`` and made one batch by ``task.collate``.
  The loss of the global batch is the mean over its p x b samples, which is the mean of
  the workers' equal-sized batch means (for a model whose forward mixes the samples of a
  batch, e.g. BatchNorm, the one global batch differs from p separate ones);
* ``torch.optim.AdamW`` (or Adam / SGD, as the job says) over parameter groups with no
  weight decay on biases and 1-D parameters when ``no_decay_bias_and_norm`` is set, the
  linear warm-up + cosine schedule through ``LambdaLR`` (the lr of step t, 0-based, is
  ``lr (t + 1) / W`` for ``t < W``, then ``lr (r + (1 - r)(1 + cos(pi s)) / 2)``,
  ``s = (t - W) / (T - W)``), gradients clipped to ``clip_grad_norm`` by global norm;
* ``precision: bfloat16``: the forward and loss under ``torch.autocast("cpu", bfloat16)``.

The evaluation set (``task.eval_data``) is evaluated before the first step, every
``eval_interval`` steps and after the last, in ``eval()`` mode: the loss and the task's
metrics as sample-weighted means over batches of ``EVAL_BATCH`` (as the runtime reports
``test_loss`` and ``test_<metric>``). Throughput is steady-state (:mod:`bench.common`'s
window) samples/s, and tokens/s when the task's samples are sequences.

Run: ``python -m bench.plain_task configs/gpt_bytes.yaml [--steps N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from actors.sampler import ShardSampler, make_shards
from actors.tasks.base import Task, TaskContext, weighted_means
from bench.common import steady_rate
from core.errors import ElasticSGDError

# Evaluation batch (samples): the size only changes how the mean is summed up.
EVAL_BATCH = 64


class PlainSetupError(ElasticSGDError, ValueError):
    """The job cannot be mirrored (the message says which field to change)."""


class _Loose(BaseModel):
    # only the fields the reference needs; the rest of a job spec is ignored here
    model_config = ConfigDict(extra="ignore", frozen=True)


class TaskRef(_Loose):
    entrypoint: str
    params: dict[str, Any] = Field(default_factory=dict)


class Schedule(_Loose):
    name: Literal["constant", "warmup_cosine", "step"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    step_size: int = 1
    gamma: float = 0.1


class Optimizer(_Loose):
    # a field the job leaves unset (None) takes torch's default for the optimizer
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] | None = None
    eps: float | None = None
    schedule: Schedule = Field(default_factory=Schedule)
    clip_grad_norm: float | None = None
    no_decay_bias_and_norm: bool = False


class PlainJob(_Loose):
    """The fields of a job spec the reference mirrors (see the module docstring)."""

    task: TaskRef
    seed: int = 0
    workers: int = 4
    batch_size: int = 32
    steps: int
    eval_interval: int = 20
    optimizer: Optimizer = Field(default_factory=Optimizer)
    precision: Literal["float32", "bfloat16"] = "float32"


def load_task(ref: TaskRef) -> Task:
    """Import ``ref.entrypoint`` (``pkg.mod:attr``) and call it with the params, validated
    into the pydantic model its one argument is annotated with (else the plain dict).

    Raises:
        PlainSetupError: the entrypoint is malformed, missing or not a task factory.
    """
    module_name, sep, attr = ref.entrypoint.partition(":")
    if not sep or not module_name or not attr:
        raise PlainSetupError(
            f"task.entrypoint {ref.entrypoint!r} is not 'package.module:attribute'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PlainSetupError(f"task.entrypoint {ref.entrypoint!r}: {exc}") from exc
    params: Any = ref.params
    model_type = _params_model(factory)
    if model_type is not None:
        params = model_type.model_validate(ref.params)
    task = factory(params)
    if not isinstance(task, Task):
        raise PlainSetupError(
            f"task.entrypoint {ref.entrypoint!r} returned {type(task).__name__}, not a Task"
        )
    return task


def _params_model(factory: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model the factory's only argument is annotated with, if any."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
        params = [p for p in inspect.signature(factory).parameters.values() if p.name != "self"]
    except (TypeError, ValueError, NameError):  # a builtin, or hints that do not resolve
        return None
    if len(params) != 1:
        return None
    hint = hints.get(params[0].name)
    return hint if inspect.isclass(hint) and issubclass(hint, BaseModel) else None


def sample_order(n_train: int, workers: int, batch_size: int, seed: int, steps: int) -> np.ndarray:
    """``(steps, workers * batch_size)`` training indices: row k is step k's global batch,
    the workers' k-th batches concatenated in worker-id order."""
    shards = make_shards(n_train, workers, seed)
    samplers = [ShardSampler(shards[i], seed=seed, shard_key=i) for i in range(workers)]
    return np.stack(
        [np.concatenate([s.next_batch(batch_size) for s in samplers]) for _ in range(steps)]
    )


def lr_factor(schedule: Schedule, t: int, total_steps: int) -> float:
    """The schedule's lr factor at step ``t`` (0-based; see the module docstring)."""
    if schedule.name == "warmup_cosine":
        w = schedule.warmup_steps
        if t < w:
            return (t + 1) / w
        s = min((t - w) / max(total_steps - w, 1), 1.0)
        r = schedule.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * s))
    if schedule.name == "step":
        return float(schedule.gamma ** (t // schedule.step_size))
    return 1.0


def param_groups(model: torch.nn.Module, opt: Optimizer) -> list[dict[str, Any]]:
    """Parameter groups: with ``no_decay_bias_and_norm`` biases and 1-D parameters get no
    weight decay; one group per weight decay, in order of first appearance."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        no_decay = opt.no_decay_bias_and_norm and (p.ndim <= 1 or name.endswith("bias"))
        groups.setdefault(0.0 if no_decay else opt.weight_decay, []).append(p)
    return [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()]


def make_optimizer(model: torch.nn.Module, opt: Optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer the job names, over :func:`param_groups`."""
    groups = param_groups(model, opt)
    if opt.name == "sgd":
        return torch.optim.SGD(
            groups, lr=opt.lr, momentum=opt.momentum or 0.0, nesterov=bool(opt.nesterov)
        )
    kind = torch.optim.Adam if opt.name == "adam" else torch.optim.AdamW
    # torch's defaults for Adam and AdamW: betas (0.9, 0.999), eps 1e-8
    betas = opt.betas if opt.betas is not None else (0.9, 0.999)
    return kind(groups, lr=opt.lr, betas=betas, eps=1e-8 if opt.eps is None else opt.eps)


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation: the step (0: the initial model), when, the loss and the metrics."""

    step: int
    wall_time_s: float
    loss: float
    metrics: dict[str, float]


@dataclass
class PlainResult:
    """What a reference run measured.

    Attributes:
        evals: every evaluation, in step order.
        train_losses: the global batch's loss at every step.
        steady_samples_per_s: steady-state training samples/s (:func:`bench.common.steady_rate`).
        tokens_per_sample: tokens in one sample (its last dimension when it is a sequence of
            ints; ``None`` for other samples).
        params: the trained model's flattened parameters (``parameters()`` order).
        torch_threads: intra-op threads the run used.
    """

    evals: list[EvalPoint]
    train_losses: list[float]
    steady_samples_per_s: float
    tokens_per_sample: int | None
    params: torch.Tensor
    torch_threads: int
    points: list[tuple[float, float, float]] = field(default_factory=list, repr=False)

    @property
    def final_eval_loss(self) -> float:
        return self.evals[-1].loss

    @property
    def steady_tokens_per_s(self) -> float | None:
        if self.tokens_per_sample is None:
            return None
        return self.steady_samples_per_s * self.tokens_per_sample


def evaluate(
    task: Task, model: torch.nn.Module, data: Any, precision: str
) -> tuple[float, dict[str, float]]:
    """The loss and metrics of ``model`` over all of ``data`` (sample-weighted means)."""
    was_training = model.training
    model.eval()
    parts: list[tuple[int, dict[str, float]]] = []
    with torch.no_grad(), _autocast(precision):
        for lo in range(0, len(data), EVAL_BATCH):
            samples = [data[i] for i in range(lo, min(lo + EVAL_BATCH, len(data)))]
            batch = task.collate(samples)
            means = {"loss": float(task.loss(model, batch)), **task.metrics(model, batch)}
            parts.append((len(samples), means))
    model.train(was_training)
    means = weighted_means(parts)
    return means.pop("loss"), means


def _autocast(precision: str) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")


def _tokens_per_sample(sample: Any) -> int | None:
    if isinstance(sample, torch.Tensor) and sample.dtype == torch.int64 and sample.ndim == 1:
        return int(sample.shape[0]) - 1  # inputs and next-token targets share one window
    return None


def train_plain(job: PlainJob, task: Task | None = None, threads: int | None = None) -> PlainResult:
    """Train ``job``'s task in this process (see the module docstring).

    Args:
        job: the job to mirror.
        task: the task object (default: :func:`load_task` of ``job.task``).
        threads: torch intra-op threads for the run (``None``: torch's current setting).

    Raises:
        PlainSetupError: the entrypoint cannot be loaded.
        ValueError: more workers than training samples.
    """
    task = load_task(job.task) if task is None else task
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(job, task)
    finally:
        torch.set_num_threads(before)


def _train(job: PlainJob, task: Task) -> PlainResult:
    device = torch.device("cpu")
    train = task.train_data(TaskContext(job.seed, 0, None, device))
    evals_data = task.eval_data(TaskContext(job.seed, None, None, device))
    torch.manual_seed(job.seed)  # as the coordinator does before building the model
    model = task.build_model()
    model.train()
    opt = make_optimizer(model, job.optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: lr_factor(job.optimizer.schedule, t, job.steps)
    )
    n_train = len(train)  # type: ignore[arg-type]  # a map-style Dataset has a length
    order = sample_order(n_train, job.workers, job.batch_size, job.seed, job.steps)
    global_batch = job.workers * job.batch_size
    first = train[int(order[0, 0])]
    evals = [EvalPoint(0, time.time(), *evaluate(task, model, evals_data, job.precision))]
    losses: list[float] = []
    points = [(0.0, time.time(), 0.0)]
    for step in range(1, job.steps + 1):
        batch = task.collate([train[int(i)] for i in order[step - 1]])
        opt.zero_grad(set_to_none=True)
        with _autocast(job.precision):
            loss = task.loss(model, batch)
        torch.autograd.backward(loss)
        if job.optimizer.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), job.optimizer.clip_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        points.append((float(step), time.time(), float(step * global_batch)))
        if step % job.eval_interval == 0 or step == job.steps:
            evals.append(
                EvalPoint(step, time.time(), *evaluate(task, model, evals_data, job.precision))
            )
    return PlainResult(
        evals=evals,
        train_losses=losses,
        steady_samples_per_s=steady_rate(points),
        tokens_per_sample=_tokens_per_sample(first),
        params=torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        torch_threads=torch.get_num_threads(),
        points=points,
    )


def load_job(path: Path, **overrides: Any) -> PlainJob:
    """A job spec file's fields for the reference, with top-level fields overridden."""
    data = yaml.safe_load(path.read_text())
    data.update({k: v for k, v in overrides.items() if v is not None})
    return PlainJob.model_validate(data)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("config", type=Path, help="a job spec with a task (e.g. configs/gpt_bytes.yaml)")
    p.add_argument("--steps", type=int, default=None, help="override the job's steps")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    job = load_job(args.config, steps=args.steps)
    r = train_plain(job, threads=args.threads)
    for e in r.evals:
        extra = " ".join(f"{k} {v:.4f}" for k, v in e.metrics.items())
        print(f"step {e.step:5d}  eval loss {e.loss:.4f}  {extra}")
    rate = f"{r.steady_samples_per_s:.1f} samples/s"
    if r.steady_tokens_per_s is not None:
        rate += f", {r.steady_tokens_per_s:.0f} tokens/s"
    print(f"{rate} on {r.torch_threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
