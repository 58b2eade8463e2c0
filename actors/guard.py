"""The consistency guard's policy: is the run inside its bound, and what to do if not.

A pure object (no Ray, no clock, no model): the coordinator hands it one
:class:`Observation` per recorded step and acts on the :class:`Decision` it returns
(policies decide, the controller acts). Two conditions, checked in this order:

* **diverged**: a loss or a gradient is non-finite, or the step's loss exceeds
  ``divergence_factor`` x the run's first recorded loss (the untrained model's). Judged from
  the first step on, warm-up included: a run that blows up in its warm-up is caught too.
  Action ``guard.on_diverged``: ``fail``, or ``rollback`` (to the last checkpoint taken
  inside the bound, with a stricter setting; ``fail`` when there is none to go back to or
  no stricter setting).
* **out of bound**: once the bound is stated (after the warm-up), the mean B̂ over the last
  ``window_steps`` samples exceeds it. Action ``guard.on_out_of_bound``: ``warn`` (once per
  excursion), ``tighten`` (a stricter setting, live; ``fail`` when there is none) or
  ``fail``.

Every action beyond ``warn`` counts against ``guard.max_actions``; past it the guard fails
the run, saying which bound was hit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from core.spec import GuardSpec


class Condition(StrEnum):
    """What the guard found."""

    WITHIN = "within"  # inside the bound (or the bound not stated yet, and finite)
    OUT_OF_BOUND = "out_of_bound"  # windowed mean B̂ > bound
    DIVERGED = "diverged"  # non-finite, or loss > divergence_factor x the first loss


class Action(StrEnum):
    """What the coordinator is told to do."""

    NONE = "none"  # carry on
    WARN = "warn"  # an event; carry on
    TIGHTEN = "tighten"  # switch to the mode's stricter setting, live
    ROLLBACK = "rollback"  # back to the last good checkpoint, with a stricter setting
    FAIL = "fail"  # end the job failed, with the reason


@dataclass(frozen=True)
class Observation:
    """What the guard judges at one recorded step.

    Args:
        step: the step just recorded.
        loss: its mean training loss (``None``: no gradient arrived, nothing to judge).
        nonfinite: a description of a non-finite gradient or loss seen since the last
            observation (``None``: all finite).
        window_mean: mean B̂ over the window (``None``: no samples).
        window_full: the window holds ``window_steps`` samples.
        bound: the stated bound (``None``: still in the warm-up).
        can_tighten: the mode has a stricter setting.
        can_rollback: a checkpoint taken inside the bound exists.
    """

    step: int
    loss: float | None
    nonfinite: str | None
    window_mean: float | None
    window_full: bool
    bound: float | None
    can_tighten: bool
    can_rollback: bool


@dataclass(frozen=True)
class Decision:
    """The guard's answer: the condition, the action and why (for the event)."""

    condition: Condition
    action: Action
    reason: str = ""


@dataclass
class GuardPolicy:
    """See the module docstring.

    Args:
        spec: the job's ``guard`` section.
    """

    spec: GuardSpec
    first_loss: float | None = None  # the run's first recorded loss (the reference)
    actions_taken: int = 0
    warned: bool = False  # an out-of-bound warning stands until the run is back inside
    history: list[Decision] = field(default_factory=list)  # every decision but NONE

    def judge(self, obs: Observation) -> Decision:
        """The decision for ``obs`` (recorded in :attr:`history` unless ``NONE``)."""
        d = self._judge(obs)
        if d.action is not Action.NONE:
            self.history.append(d)
            if d.action in (Action.TIGHTEN, Action.ROLLBACK):
                self.actions_taken += 1
        return d

    def _judge(self, obs: Observation) -> Decision:
        why = self._diverged(obs)
        if why is not None:
            return self._on_diverged(obs, why)
        out = (
            obs.bound is not None
            and obs.window_full
            and obs.window_mean is not None
            and obs.window_mean > obs.bound
        )
        if not out:
            self.warned = False
            return Decision(Condition.WITHIN, Action.NONE)
        assert obs.window_mean is not None and obs.bound is not None
        why = (
            f"out of bound: mean B̂ {obs.window_mean:.4g} over the last "
            f"{self.spec.window_steps} samples > bound {obs.bound:.4g}"
        )
        return self._on_out_of_bound(obs, why)

    def _diverged(self, obs: Observation) -> str | None:
        if obs.nonfinite is not None:
            return f"diverged: {obs.nonfinite}"
        if obs.loss is None:
            return None
        if not math.isfinite(obs.loss):
            return f"diverged: loss {obs.loss} at step {obs.step}"
        if self.first_loss is None:
            self.first_loss = obs.loss
            return None
        limit = self.spec.divergence_factor * self.first_loss
        if self.first_loss > 0 and obs.loss > limit:
            return (
                f"diverged: loss {obs.loss:.3g} > {self.spec.divergence_factor:g} x first "
                f"loss {self.first_loss:.3g} (step {obs.step})"
            )
        return None

    def healthy(self, loss: float | None) -> bool:
        """Whether a model with this step's ``loss`` may be a rollback's destination: a
        finite loss no worse than the run's first (the untrained model's). A checkpoint
        inside the bound but on its way to a divergence (loss climbing) would put a
        rollback straight back on that way."""
        if loss is None or self.first_loss is None:
            return loss is None or math.isfinite(loss)
        return math.isfinite(loss) and loss <= self.first_loss

    def _budget_left(self) -> bool:
        return self.actions_taken < self.spec.max_actions

    def _exhausted(self, why: str) -> str:
        return f"{why}; guard.max_actions={self.spec.max_actions} used up"

    def _on_diverged(self, obs: Observation, why: str) -> Decision:
        if self.spec.on_diverged == "fail":
            return Decision(Condition.DIVERGED, Action.FAIL, why)
        if not self._budget_left():
            return Decision(Condition.DIVERGED, Action.FAIL, self._exhausted(why))
        if not obs.can_rollback:
            return Decision(
                Condition.DIVERGED, Action.FAIL, f"{why}; no checkpoint inside the bound"
            )
        if not obs.can_tighten:
            return Decision(Condition.DIVERGED, Action.FAIL, f"{why}; no stricter setting")
        return Decision(Condition.DIVERGED, Action.ROLLBACK, why)

    def _on_out_of_bound(self, obs: Observation, why: str) -> Decision:
        policy = self.spec.on_out_of_bound
        if policy == "fail":
            return Decision(Condition.OUT_OF_BOUND, Action.FAIL, why)
        if policy == "warn":
            if self.warned:
                return Decision(Condition.OUT_OF_BOUND, Action.NONE, why)
            self.warned = True
            return Decision(Condition.OUT_OF_BOUND, Action.WARN, why)
        if not self._budget_left():
            return Decision(Condition.OUT_OF_BOUND, Action.FAIL, self._exhausted(why))
        if not obs.can_tighten:
            return Decision(Condition.OUT_OF_BOUND, Action.FAIL, f"{why}; no stricter setting")
        return Decision(Condition.OUT_OF_BOUND, Action.TIGHTEN, why)

    @property
    def verdict(self) -> Condition:
        """The run's verdict so far: the last condition acted on that was not repaired
        (a tighten or rollback that worked leaves the run ``within``)."""
        if self.history and self.history[-1].action in (Action.FAIL, Action.WARN):
            return self.history[-1].condition
        return Condition.WITHIN
