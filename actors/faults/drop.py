"""``drop``: a gradient message is lost on its way to the coordinator.

Decided on the receive path (:meth:`Drop.on_reply`), per reply: at the exact ``steps``; with
``probability`` per step (one draw per step and worker, inside the window if a duration is
given); for ``duration_steps`` (default 1) steps from ``at_step``; or once, for the first
reply at or after ``at_s``. The coordinator then counts the loss and lets the step's
missing-gradient policy decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from actors.faults.actions import ReplyVerdict
from actors.faults.base import FaultType, Memo
from actors.faults.plan import ActiveFault
from core.events import FaultKind


def _hit(f: ActiveFault, worker: int, step: int, t_s: float, memo: Memo) -> bool:
    s = f.spec
    key = f"drop:{f.index}:{worker}"
    if s.steps is not None:
        return step in s.steps
    if s.probability is not None:
        return (
            f.in_window(step, t_s, memo.starts, key)
            and memo.once(f"{key}:{step}")
            and bool(memo.rng.random() < s.probability)
        )
    if s.at_step is not None:
        return s.at_step <= step < s.at_step + (s.duration_steps or 1)
    if s.at_s is not None:
        return t_s >= s.at_s and key not in memo.fired
    return False


class Drop(FaultType):
    kind: ClassVar[FaultKind] = FaultKind.DROP
    order: ClassVar[int] = 50  # after partition: a held reply is not dropped (yet)

    @override
    def on_reply(
        self,
        faults: Sequence[ActiveFault],
        worker: int,
        step: int | None,
        t_s: float,
        cut_off: bool,
        memo: Memo,
    ) -> ReplyVerdict:
        if step is None:  # a failed call carries no gradient to lose
            return ReplyVerdict.DELIVER
        for f in faults:
            if f.hits(worker) and _hit(f, worker, step, t_s, memo):
                memo.fired.add(f"drop:{f.index}:{worker}")
                return ReplyVerdict.DROP
        return ReplyVerdict.DELIVER
