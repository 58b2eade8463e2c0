"""The job's learning-rate schedules: ``torch.optim.lr_scheduler`` objects and their
closed forms.

:func:`make_scheduler` builds the scheduler the coordinator steps once per full step
(``LambdaLR`` over :class:`WarmupCosine` for linear warm-up + cosine, ``StepLR``);
:func:`schedule_factor` is the same factor in closed form at any step, for a per-block
update that belongs to a step other than the scheduler's current one
(:meth:`actors.optim.RecordOptimizer.step_block`) and for a scratch optimizer that sets its
lrs itself.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, StepLR

from core.spec import OptimizerSpec, StepSchedule, WarmupCosineSchedule


def warmup_cosine_factor(t: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The lr factor of step ``t`` (0-based): linear warm-up, then cosine to the run's end.

    ``(t + 1) / W`` for ``t < W``; then ``r + (1 - r) (1 + cos(pi s)) / 2`` with
    ``s = (t - W) / (T - W)`` (clamped to 1), ``W`` warm-up steps, ``T`` total steps,
    ``r`` the final ratio.
    """
    if t < warmup_steps:
        return (t + 1) / warmup_steps
    s = min((t - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * s))


@dataclass
class WarmupCosine:
    """:func:`warmup_cosine_factor` as a ``LambdaLR`` factor (an object, so the scheduler's
    ``state_dict`` carries it)."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def __call__(self, t: int) -> float:
        return warmup_cosine_factor(t, self.warmup_steps, self.total_steps, self.min_lr_ratio)


def schedule_factor(spec: OptimizerSpec, t: int, total_steps: int) -> float:
    """The closed form of the schedule's factor at step ``t`` (``StepLR``'s recursion gives
    the same value up to rounding)."""
    sch = spec.schedule
    if isinstance(sch, WarmupCosineSchedule):
        return warmup_cosine_factor(t, sch.warmup_steps, total_steps, sch.min_lr_ratio)
    if isinstance(sch, StepSchedule):
        return float(sch.gamma ** (t // sch.step_size))
    return 1.0


def lr_ratio(spec: OptimizerSpec, total_steps: int, lag: int | None) -> float:
    """How much larger an earlier step's lr can be than the current one: ``max_k max_j
    lr_j / lr_k`` over the run's steps ``k`` and the steps ``j`` in ``[k - lag, k]`` (every
    ``j <= k`` for ``lag=None``). B̂ divides a gap by the *current* lr while the gap was
    opened by steps at their own lrs, so a bound in lr units holds times this
    (docs/consistency.md, "The lr schedule"). 1 for a constant lr, and whenever the lr
    only grows (warm-up); ``inf`` if the lr reaches 0.

    Args:
        spec: the optimizer and its schedule.
        total_steps: the run's steps.
        lag: how many steps back a gap reaches (a mode's ``max_lag`` or ``tau``), or
            ``None``: the whole run (a cumulative gap, such as lost gradients').
    """
    if spec.schedule.name == "constant":
        return 1.0
    worst, peak = 1.0, 0.0
    window: deque[tuple[int, float]] = deque()  # (step, factor), factors decreasing
    for k in range(max(total_steps, 1)):
        f = schedule_factor(spec, k, total_steps)
        if lag is None:
            peak = max(peak, f)
        else:
            while window and window[-1][1] <= f:
                window.pop()
            window.append((k, f))
            while window[0][0] < k - lag:
                window.popleft()
            peak = window[0][1]
        if f <= 0.0:
            return math.inf if peak > 0.0 else worst
        worst = max(worst, peak / f)
    return worst


def make_scheduler(spec: OptimizerSpec, opt: Optimizer, total_steps: int) -> LRScheduler | None:
    """The ``torch.optim.lr_scheduler`` of the spec's schedule (``None``: constant)."""
    sch = spec.schedule
    if isinstance(sch, WarmupCosineSchedule):
        return LambdaLR(opt, WarmupCosine(sch.warmup_steps, total_steps, sch.min_lr_ratio))
    if isinstance(sch, StepSchedule):
        return StepLR(opt, step_size=sch.step_size, gamma=sch.gamma)
    return None
