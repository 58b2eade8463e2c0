"""``straggler(beta, max_lag)``: straggler-tolerant steps, with a hard lag bound.

A worker that sent its step-j gradient starts the next step once a ``beta`` share of the
*other* workers assigned to step j have sent theirs (or step j is complete; ``beta = 1``
always waits for completion, which is sync), never more than ``max_lag`` steps ahead of the
oldest incomplete step; its view is the model of record plus the provisional (partial)
updates of the incomplete steps. A worker behind the frontier jumps to it
(:class:`actors.scheduling.StragglerRule`). This was the project's first "elastic" rule; the
paper's per-block rule is :mod:`actors.modes.elastic`.
"""

from __future__ import annotations

from typing import ClassVar

from typing_extensions import override

from actors.consistency import elastic_amplification
from actors.modes.base import ModeContext, update_constant
from actors.modes.stepped import StepEngine
from actors.scheduling import make_step_rule
from actors.warmup import Constants
from core.spec import JobSpec, ModeSpec, OptimizerSpec, StragglerMode


def straggler_bound_term(
    beta: float, max_lag: int, grad_bound: float, min_workers: int, opt: OptimizerSpec
) -> float:
    """The straggler mode's bound on B (docs/consistency.md: straggler).

    A provisional step misses at most a ``1 - beta`` share of the other workers' gradients,
    ``(1 - beta) G`` in the mean, plus ``G / min_workers`` when the step's contributor count
    changes between the view and the end (a join or leave); ``max_lag`` such steps, each
    error amplified by the optimizer (:func:`elastic_amplification`).

    Args:
        beta: the rule's share in [0, 1] (1: sync, the bound is 0).
        max_lag: steps a worker may run ahead.
        grad_bound: ``G``, a bound on one worker's gradient norm (Adam/AdamW: ``U``, the
            bound on one update in update units).
        min_workers: the fewest workers a step can have.
        opt: the optimizer settings (momentum, weight decay, lr, Nesterov).
    """
    if beta >= 1.0:
        return 0.0
    if opt.adaptive:
        # Adam's update is not linear in the gradient: a provisional step and the true one
        # are each at most U (``grad_bound`` in update units) apart from nothing, so 2U per
        # step, max_lag steps, no further amplification (docs: adaptive optimizers)
        return 2.0 * grad_bound * max_lag
    per_step = ((1.0 - beta) + 1.0 / max(min_workers, 1)) * grad_bound
    amp = elastic_amplification(max_lag, opt.momentum, opt.weight_decay, opt.lr, opt.nesterov)
    return per_step * amp


class StragglerEngine(StepEngine):
    """Straggler-tolerant steps: provisional views, workers run ahead by at most ``max_lag``."""

    name: ClassVar[str] = "straggler"

    def __init__(self, ctx: ModeContext) -> None:
        mode = ctx.spec.mode
        assert isinstance(mode, StragglerMode)
        super().__init__(ctx, make_step_rule(mode))

    @override
    @classmethod
    def bound_term(cls, spec: JobSpec, c: Constants) -> float:
        mode = spec.mode
        assert isinstance(mode, StragglerMode)
        # G: the frozen bound M on one worker's gradient norm (docs: the constants)
        m, _, _ = update_constant(spec, c)
        return straggler_bound_term(mode.beta, mode.max_lag, m, spec.min_workers, spec.optimizer)

    @override
    def tighten(self) -> ModeSpec | None:
        """A larger share of the others to wait for (β + 0.25, up to 1 = sync)."""
        mode = self.spec.mode
        assert isinstance(mode, StragglerMode)
        if mode.beta >= 1.0:
            return None
        return mode.model_copy(update={"beta": min(1.0, mode.beta + 0.25)})

    @override
    def retune(self, setting: ModeSpec) -> int:
        assert isinstance(setting, StragglerMode)
        super().retune(setting)
        self.rule = make_step_rule(setting)
        return 0
