"""The bound stated in advance, and the guard wired to the run.

:class:`Guarding` holds the warm-up estimator (:class:`actors.consistency.WarmupEstimator`),
the frozen constants and the bound stated from them, and the guard's policy
(:class:`actors.guard.GuardPolicy`). :class:`~actors.coordinator.training.Training` feeds it
every gradient that arrives and every recorded step; it returns the policy's decision, and
the coordinator acts on it (a tighten is applied here, through the mode; a rollback and a
failure by the loop, which owns the run's state). Every statement of the bound is a
``bound`` event, every action a ``guard`` event.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch

from actors.consistency import ConsistencyMonitor, ObservedNorms, drop_fraction
from actors.coordinator.reporting import Reporter
from actors.faults import ActiveFault
from actors.guard import Action, Condition, Decision, GuardPolicy, Observation
from actors.messages import GradientReply
from actors.modes.base import Mode
from actors.modes.registry import analytic_bound
from actors.warmup import Constants, WarmupEstimator
from core.events import EventKind
from core.spec import JobSpec, LocalMode, ModeSpec


def _setting_change(old: ModeSpec, new: ModeSpec) -> str:
    """``mode.max_staleness 16 -> 8`` for the fields that differ."""
    a, b = old.model_dump(), new.model_dump()
    return ", ".join(f"mode.{k} {a[k]} -> {b[k]}" for k in a if a[k] != b[k]) or "unchanged"


class Guarding:
    """See the module docstring.

    Args:
        spec: the job (its ``guard`` section, mode and optimizer).
        mode: the consistency mode (its bound term, its stricter setting).
        monitor: the B̂ samples (the verdict's window).
        compression: the compressor's error factor ``q`` and whether workers keep
            error-feedback memories.
        reporter: where ``bound`` and ``guard`` events go.
        plan: the fault plan (its drop faults give the drop share of the bound).
    """

    def __init__(
        self,
        spec: JobSpec,
        mode: Mode,
        monitor: ConsistencyMonitor,
        compression: tuple[float, bool],
        reporter: Reporter,
        plan: list[ActiveFault],
    ) -> None:
        self.spec, self.mode, self.monitor, self.reporter = spec, mode, monitor, reporter
        self.q, self.error_feedback = compression
        self.plan = plan
        g = spec.guard
        self.estimator = WarmupEstimator(
            g.warmup_steps,
            g.safety_factor,
            spec.optimizer.weight_decay,
            spec.mode.local_steps if isinstance(spec.mode, LocalMode) else 1,
        )
        self.policy = GuardPolicy(g)
        self.constants: Constants | None = None
        self.stated: float | None = None
        self.nonfinite: str | None = None  # since the last judged step

    # -- what the run feeds in ---------------------------------------------------------------
    def see_reply(self, worker: int, reply: GradientReply, grad: torch.Tensor) -> None:
        """A gradient that counts: warm-up statistics, and whether it is finite."""
        if not (math.isfinite(reply.loss) and math.isfinite(reply.sent_norm)):
            self.nonfinite = (
                f"non-finite gradient or loss from worker-{worker} at step {reply.step} "
                f"(loss {reply.loss}, gradient norm {reply.sent_norm})"
            )
            return
        est = self.estimator
        # Adam: the gradient in update units too (warm-up only; docs: adaptive optimizers)
        pre = self.mode.model.opt.precondition(grad) if est.frozen is None else None
        est.see_grad(reply.step, grad, reply.sent_norm, reply.raw_norm, pre)

    def after_step(
        self,
        step: int,
        loss: float,
        x: torch.Tensor,
        can_rollback: bool,
        lr: float | None = None,
    ) -> Decision:
        """A step was recorded at model ``x`` (applied at base lr ``lr``): freeze the
        constants when the warm-up ends, then judge (``loss`` nan: no gradient arrived)."""
        c = self.estimator.step_done(step, x, lr)
        if c is not None:
            self.constants = c
            self.state_bound("stated", f"after {c.warmup_steps} warm-up steps")
        obs = Observation(
            step=step,
            loss=None if math.isnan(loss) else loss,
            nonfinite=self.nonfinite,
            window_mean=self.monitor.window_mean,
            window_full=self.monitor.window_full,
            bound=self.stated,
            can_tighten=self.mode.tighten() is not None,
            can_rollback=can_rollback,
        )
        self.nonfinite = None
        return self.policy.judge(obs)

    # -- the bound ---------------------------------------------------------------------------
    def lost_fraction(self) -> float:
        drops = [f.targets for f in self.plan if f.spec.kind == "drop"]
        return drop_fraction(drops, self.spec.workers)

    def state_bound(self, how: str, why: str) -> None:
        """(Re)compute the bound from the frozen constants and the current settings."""
        c = self.constants
        if c is None:
            return
        b = analytic_bound(
            self.spec,
            c,
            self.q,
            self.error_feedback,
            self.lost_fraction(),
            self.mode.total_steps,
        )
        self.stated = b if math.isfinite(b) else None
        consts = ", ".join(f"{k} {v:.4g}" for k, v in c.public().items() if v is not None)
        self.reporter.event(
            EventKind.BOUND,
            f"bound {how} {why}: {consts} (safety x{c.safety_factor:g}); "
            f"{self.spec.mode.name} {self.spec.mode.model_dump()} -> bound on B "
            f"{self.stated if self.stated is None else format(self.stated, '.4g')}",
            guard=how,
        )

    # -- acting ------------------------------------------------------------------------------
    def tighten(self, why: str) -> tuple[ModeSpec, int] | None:
        """Switch the mode to its stricter setting (event, bound restated, a fresh window).

        Returns:
            The new setting and the gradients it refused, or ``None``: there is none.
        """
        new = self.mode.tighten()
        if new is None:
            return None
        old = self.spec.mode
        refused = self.mode.retune(new)
        self.monitor.reset_window()
        self.reporter.event(
            EventKind.GUARD, f"tighten: {_setting_change(old, new)}; {why}", guard="tighten"
        )
        self.state_bound("restated", f"for {_setting_change(old, new)}")
        return new, refused

    def rolled_back(
        self, checkpoint: str, step: int, old: ModeSpec, why: str, dropped: list[str]
    ) -> None:
        """The loop restored ``checkpoint`` (and deleted the newer ``dropped``): say so,
        restart an unfinished warm-up."""
        if self.constants is None:  # the warm-up saw the divergence: estimate again
            e = self.estimator
            self.estimator = WarmupEstimator(
                e.warmup_steps, e.safety_factor, e.weight_decay, e.per_message_steps, step
            )
        self.monitor.reset_window()
        self.nonfinite = None
        gone = f" ({len(dropped)} newer checkpoints of the abandoned run deleted)" * bool(dropped)
        self.reporter.event(
            EventKind.GUARD,
            f"rollback to {checkpoint} (step {step}) with {_setting_change(old, self.spec.mode)}"
            f"{gone}; {why}",
            guard="rollback",
            step=step,
        )
        self.state_bound("restated", f"for {_setting_change(old, self.spec.mode)}")

    def warn(self, d: Decision) -> None:
        self.reporter.event(EventKind.GUARD, f"warn: {d.reason}", guard="warn")

    def failed(self, d: Decision) -> None:
        self.reporter.event(EventKind.GUARD, f"fail: {d.reason}", guard="fail")

    # -- reporting and checkpoints -------------------------------------------------------------
    def verdict(self) -> str:
        v = self.policy.verdict
        if v is Condition.WITHIN and self.stated is None:
            return "not_stated"
        return v.value

    def consistency(self, norms: ObservedNorms) -> dict[str, Any]:
        """The summary's consistency section: B̂ against the frozen bound, the warm-up's
        constants, the guard's verdict, and the run's observed norms (reported only)."""
        cons = self.monitor.summary(self.stated)
        cons.update(self.summary())
        cons["norms"] = {
            "grad_max": norms.grad_max,
            "raw_grad_max": norms.raw_grad_max,
            "update_max": norms.update_max,
            "update_block_sum_max": norms.update_block_sum_max,
        }
        cons["compression_q"] = self.q
        return cons

    def summary(self) -> dict[str, Any]:
        """The summary's consistency fields of the guard (merged into ``consistency``)."""
        c = self.constants
        return {
            "warmup_steps": self.spec.guard.warmup_steps,
            "window_steps": self.spec.guard.window_steps,
            "constants": None if c is None else c.public(),
            "frozen_at_step": None if c is None else c.frozen_at_step,
            "verdict": self.verdict(),
            "guard_actions": [
                {"condition": d.condition.value, "action": d.action.value, "reason": d.reason}
                for d in self.policy.history
                if d.action is not Action.NONE
            ],
        }

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (a restarted coordinator must not re-estimate)."""
        return {
            "constants": None if self.constants is None else asdict(self.constants),
            "first_loss": self.policy.first_loss,
            "actions_taken": self.policy.actions_taken,
            "mode": self.spec.mode.model_dump(),
        }

    def load(self, st: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state` (empty: nothing to load)."""
        if not st:
            return
        self.policy.first_loss = st.get("first_loss")
        self.policy.actions_taken = int(st.get("actions_taken") or 0)
        mode = st.get("mode")
        if mode is not None and mode != self.spec.mode.model_dump():
            self.mode.retune(type(self.spec.mode).model_validate(mode))
        c = st.get("constants")
        if c is not None:
            self.constants = Constants(**c)
            self.estimator.frozen = self.constants
            self.state_bound("restated", "from the checkpoint's frozen constants")
