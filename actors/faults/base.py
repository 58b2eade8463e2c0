"""The interface of a fault kind: three hooks, each returning a typed decision.

A kind (one module each: :mod:`~actors.faults.crash`, :mod:`~actors.faults.drop`, ...)
subclasses :class:`FaultType` and overrides the hooks it needs:

* :meth:`FaultType.on_tick` — coordinator side, once per loop turn: given the step, the
  time and the live workers, the actions due now (kill, partition, ...);
* :meth:`FaultType.on_reply` — the coordinator's receive path: deliver, drop or hold;
* :meth:`FaultType.on_gradient` — worker side, on every gradient: stall, or corrupt it.

Each hook gets the plan's faults *of its kind* (in plan order) and a :class:`Memo`, the
state that must outlive a call: the seeded RNG, the ``fired`` keys (checkpointed, so a
restarted coordinator fires no one-shot fault twice), per-step draws already made, and
where windows measured in the other unit than their trigger opened. Kinds hold no state of
their own, so one instance serves every job. ``order`` fixes the order in which kinds are
asked (a coordinator crash ends the tick; a partition holds a reply before a drop is
drawn for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from actors.faults.actions import NO_EFFECT, GradientEffect, ReplyVerdict, TickAction
from actors.faults.plan import ActiveFault
from core.events import FaultKind


@dataclass
class Memo:
    """What the fault hooks remember between calls (one per engine, one per worker).

    Args:
        rng: the seeded RNG that probabilistic triggers and random delays draw from.
        fired: keys of faults that fired (``<kind>:<index>[:<worker>]``; checkpointed).
    """

    rng: np.random.Generator
    fired: set[str] = field(default_factory=set)
    # per-step keys whose probability was drawn already (one draw per step)
    checked: set[str] = field(default_factory=set)
    # where a window opened, when its length is in the other unit than its trigger
    starts: dict[str, tuple[int, float]] = field(default_factory=dict)

    def once(self, key: str) -> bool:
        """True the first time ``key`` is asked (per-step probability draws happen once)."""
        if key in self.checked:
            return False
        self.checked.add(key)
        return True


@dataclass(frozen=True)
class Tick:
    """What the coordinator sees when it asks which faults fire now.

    Args:
        step: the coordinator's step (steps completed; async: updates // workers).
        t_s: seconds since the job started.
        live: ids of the workers in the membership that have started.
        cut_off: ids of the workers whose replies are held by a partition now (live, or
            declared lost while cut off).
    """

    step: int
    t_s: float
    live: Sequence[int]
    cut_off: frozenset[int] = frozenset()


class FaultType:
    """One fault kind's behaviour; the default hooks do nothing."""

    kind: ClassVar[FaultKind]
    # the order kinds are asked in (lower first)
    order: ClassVar[int]

    def on_tick(self, faults: Sequence[ActiveFault], now: Tick, memo: Memo) -> list[TickAction]:
        """Coordinator side: the actions due at ``now`` (mark one-shot firings in ``memo``)."""
        del faults, now, memo
        return []

    def on_reply(
        self,
        faults: Sequence[ActiveFault],
        worker: int,
        step: int | None,
        t_s: float,
        cut_off: bool,
        memo: Memo,
    ) -> ReplyVerdict:
        """The receive path: what happens to ``worker``'s reply for ``step``.

        Args:
            step: the reply's step (None: the call failed, there is no gradient).
            cut_off: whether the coordinator holds the worker's replies (partition on).
        """
        del faults, worker, step, t_s, cut_off, memo
        return ReplyVerdict.DELIVER

    def on_gradient(
        self, faults: Sequence[ActiveFault], step: int, t_s: float, memo: Memo
    ) -> GradientEffect:
        """Worker side: the effect on this worker's gradient of ``step`` (the faults given
        are the ones that target this worker)."""
        del faults, step, t_s, memo
        return NO_EFFECT
