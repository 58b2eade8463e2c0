"""``coordinator_crash``: the coordinator kills its own process at ``at_step``.

Ray restarts the actor (``max_coordinator_restarts``) and it resumes from its latest
checkpoint. The key ``coordinator_crash:<index>`` is written out *before* the kill, so the
restarted coordinator does not fire it again. Nothing else of the tick runs after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from actors.faults.actions import KillCoordinator, TickAction
from actors.faults.base import FaultType, Memo, Tick
from actors.faults.plan import ActiveFault
from core.events import FaultKind


class CoordinatorCrash(FaultType):
    kind: ClassVar[FaultKind] = FaultKind.COORDINATOR_CRASH
    order: ClassVar[int] = 0  # first: when it fires, no other fault of the tick does

    @override
    def on_tick(self, faults: Sequence[ActiveFault], now: Tick, memo: Memo) -> list[TickAction]:
        for f in faults:
            key = f"coordinator_crash:{f.index}"
            if key not in memo.fired and f.spec.at_step is not None and now.step >= f.spec.at_step:
                memo.fired.add(key)
                return [KillCoordinator(now.step)]
        return []
