"""``crash``: a worker's process is killed for real (SIGKILL), and may rejoin.

Fires once per target: at ``at_step`` / ``at_s``, or with ``probability`` per step (one
draw per step and target). Its key ``crash:<index>:<worker>`` goes into ``fired``, so a
restarted coordinator does not kill the same worker again. The coordinator carries out the
:class:`~actors.faults.actions.KillWorker` (and schedules the rejoin).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from actors.faults.actions import KillWorker, TickAction
from actors.faults.base import FaultType, Memo, Tick
from actors.faults.plan import ActiveFault
from core.events import FaultKind


class Crash(FaultType):
    kind: ClassVar[FaultKind] = FaultKind.CRASH
    order: ClassVar[int] = 10

    @override
    def on_tick(self, faults: Sequence[ActiveFault], now: Tick, memo: Memo) -> list[TickAction]:
        due: list[TickAction] = []
        for f in faults:
            for wid in f.targets:
                key = f"crash:{f.index}:{wid}"
                if wid not in now.live or key in memo.fired:
                    continue
                p = f.spec.probability
                if p is not None:
                    if not memo.once(f"{key}:{now.step}") or memo.rng.random() >= p:
                        continue
                elif not f.triggers_at(now.step, now.t_s, memo.rng):
                    continue
                memo.fired.add(key)
                due.append(KillWorker(wid, f.spec.rejoin_after_s))
        return due
