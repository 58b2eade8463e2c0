"""The coordinator's side of the fault plan: which fault fires now, on whom (pure logic).

:class:`FaultEngine` holds the job's bound plan, the ``fired`` keys and the seeded RNG, and
asks every registered kind (:mod:`actors.faults.registry`) its hooks: :meth:`FaultEngine.tick`
once per loop turn, :meth:`FaultEngine.on_reply` for every reply on the receive path. It
returns typed decisions (:mod:`actors.faults.actions`); the coordinator carries them out
for real (a SIGKILL of the worker's process, a gradient message discarded, replies held
back for the partition window, the coordinator's own process killed) and records the
events. Stalls and corruptions are the worker's own business
(:class:`actors.faults.worker.WorkerFaults`).

Every firing is keyed (``<kind>:<index>:<worker>``, or ``coordinator_crash:<index>``) and
remembered in ``fired``, which goes into checkpoints, so a restarted coordinator does not
fire a one-shot fault twice. The coordinator adds keys of its own (``scale:<i>`` for the
scale plan) to the same set.
"""

from __future__ import annotations

import numpy as np

from actors.faults.actions import ReplyVerdict, TickAction
from actors.faults.base import FaultType, Memo, Tick
from actors.faults.plan import ActiveFault
from actors.faults.registry import fault_types


class FaultEngine:
    """Decides coordinator-side faults.

    Args:
        plan: the job's bound faults (the engine keeps this list; more can be added while
            the job runs, see :meth:`add`).
        seed: the job seed (probabilistic triggers draw from it).
        fired: keys of faults that already fired (restored from a checkpoint).
    """

    def __init__(self, plan: list[ActiveFault], seed: int, fired: set[str] | None = None) -> None:
        self.plan = plan
        self.memo = Memo(rng=np.random.default_rng([seed, 15485863]), fired=set(fired or ()))
        self.kinds: list[FaultType] = fault_types()

    @property
    def fired(self) -> set[str]:
        """Keys of what fired (the set itself: callers may add their own keys)."""
        return self.memo.fired

    def add(self, fault: ActiveFault) -> None:
        """Add a fault to the running plan (an injection)."""
        self.plan.append(fault)

    def _of(self, kind: FaultType) -> list[ActiveFault]:
        return [f for f in self.plan if f.spec.kind == kind.kind.value]

    def tick(self, now: Tick) -> list[TickAction]:
        """Every action due at ``now``, kind by kind; nothing after a final action (the
        coordinator's own crash)."""
        out: list[TickAction] = []
        for kind in self.kinds:
            faults = self._of(kind)
            if not faults:
                continue
            for action in kind.on_tick(faults, now, self.memo):
                out.append(action)
                if action.final:
                    return out
        return out

    def on_reply(self, worker: int, step: int | None, t_s: float, cut_off: bool) -> ReplyVerdict:
        """What the network path does with ``worker``'s reply for ``step`` (the first kind
        that does not deliver decides; later kinds are not asked, so draw nothing).

        Args:
            step: the reply's step (None: the call failed).
            cut_off: whether the coordinator holds the worker's replies now.
        """
        for kind in self.kinds:
            faults = self._of(kind)
            if not faults:
                continue
            verdict = kind.on_reply(faults, worker, step, t_s, cut_off, self.memo)
            if verdict is not ReplyVerdict.DELIVER:
                return verdict
        return ReplyVerdict.DELIVER
