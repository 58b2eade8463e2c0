"""``partition``: a worker cannot reach the coordinator for a window.

Coordinator side, each tick: a started worker whose window opened and that is not cut off
yet gets a :class:`~actors.faults.actions.PartitionStart`; a cut-off worker (live, or
declared lost while cut off) whose windows have all ended gets a
:class:`~actors.faults.actions.PartitionHeal`. On the receive path a cut-off worker's
replies are held (:meth:`Partition.on_reply`); what heals means (deliver the held reply, or
restart a worker that was declared lost for want of a heartbeat) is the coordinator's part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from actors.faults.actions import PartitionHeal, PartitionStart, ReplyVerdict, TickAction
from actors.faults.base import FaultType, Memo, Tick
from actors.faults.plan import ActiveFault
from core.events import FaultKind


def _active(faults: Sequence[ActiveFault], worker: int, now: Tick, memo: Memo) -> bool:
    return any(
        f.hits(worker)
        and f.in_window(now.step, now.t_s, memo.starts, f"partition:{f.index}:{worker}")
        for f in faults
    )


class Partition(FaultType):
    kind: ClassVar[FaultKind] = FaultKind.PARTITION
    order: ClassVar[int] = 30

    @override
    def on_tick(self, faults: Sequence[ActiveFault], now: Tick, memo: Memo) -> list[TickAction]:
        out: list[TickAction] = []
        for wid in now.live:
            active = _active(faults, wid, now, memo)
            if active and wid not in now.cut_off:
                out.append(PartitionStart(wid))
            elif not active and wid in now.cut_off:
                out.append(PartitionHeal(wid))
        live = set(now.live)
        for wid in sorted(now.cut_off - live):  # declared lost while cut off
            if not _active(faults, wid, now, memo):
                out.append(PartitionHeal(wid))
        return out

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
        return ReplyVerdict.HOLD if cut_off else ReplyVerdict.DELIVER
