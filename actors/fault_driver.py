"""The coordinator's side of the fault plan: which fault fires now, on whom (pure logic).

Crashes, drops, partitions and coordinator crashes are decided where the coordinator can
observe the step and the clock, then carried out for real by the coordinator (a SIGKILL of
the worker's process, a gradient message discarded on the receive path, replies held back
for the partition window, the coordinator's own process killed). Delays are the worker's
own business (:class:`actors.faults.WorkerFaults`).

Every firing is keyed (fault index, worker, and step for per-step faults) and remembered in
``fired``, which goes into checkpoints, so a restarted coordinator does not fire a one-shot
fault twice.
"""

from __future__ import annotations

import numpy as np

from actors.faults import ActiveFault


class FaultDriver:
    """Decides coordinator-side faults.

    Args:
        plan: the job's bound faults (more can be added while it runs).
        seed: the job seed (probabilistic triggers draw from it).
        fired: keys of faults that already fired (restored from a checkpoint).
    """

    def __init__(self, plan: list[ActiveFault], seed: int, fired: set[str] | None = None) -> None:
        self.plan = plan
        self.fired: set[str] = set(fired or ())
        self.rng = np.random.default_rng([seed, 15485863])  # fixed salt
        self._checked: set[str] = set()
        self._starts: dict[str, tuple[int, float]] = {}

    def add(self, fault: ActiveFault) -> None:
        self.plan.append(fault)

    def _of(self, kind: str) -> list[ActiveFault]:
        return [f for f in self.plan if f.spec.kind == kind]

    def _once(self, key: str) -> bool:
        """True the first time ``key`` is asked (per-step probability draws happen once)."""
        if key in self._checked:
            return False
        self._checked.add(key)
        return True

    def crashes_due(self, step: int, t_s: float, live: list[int]) -> list[tuple[ActiveFault, int]]:
        """Crash faults that fire now, with their target worker."""
        due = []
        for f in self._of("crash"):
            for wid in f.targets:
                key = f"crash:{f.index}:{wid}"
                if wid not in live or key in self.fired:
                    continue
                if f.spec.probability is not None:
                    if not self._once(f"{key}:{step}") or self.rng.random() >= f.spec.probability:
                        continue
                elif not f.triggers_at(step, t_s, self.rng):
                    continue
                self.fired.add(key)
                due.append((f, wid))
        return due

    def drop_due(self, wid: int, step: int, t_s: float) -> ActiveFault | None:
        """The drop fault that loses ``wid``'s gradient of ``step``, if any."""
        for f in self._of("drop"):
            if not f.hits(wid):
                continue
            s = f.spec
            if s.steps is not None:
                hit = step in s.steps
            elif s.probability is not None:
                in_window = f.in_window(step, t_s, self._starts, f"drop:{f.index}:{wid}")
                hit = (
                    in_window
                    and self._once(f"drop:{f.index}:{wid}:{step}")
                    and (self.rng.random() < s.probability)
                )
            elif s.at_step is not None:
                length = s.duration_steps or 1
                hit = s.at_step <= step < s.at_step + length
            elif s.at_s is not None:
                hit = t_s >= s.at_s and f"drop:{f.index}:{wid}" not in self.fired
            else:
                hit = False
            if hit:
                self.fired.add(f"drop:{f.index}:{wid}")
                return f
        return None

    def partition_active(self, wid: int, step: int, t_s: float) -> ActiveFault | None:
        """The partition window ``wid`` is in now, if any."""
        for f in self._of("partition"):
            if f.hits(wid) and f.in_window(step, t_s, self._starts, f"partition:{f.index}:{wid}"):
                return f
        return None

    def delays_started(
        self, step: int, t_s: float, live: list[int]
    ) -> list[tuple[ActiveFault, int]]:
        """Delay windows that opened since the last call (the worker stalls itself; the
        coordinator only records that the fault is on)."""
        out = []
        for f in self._of("delay"):
            for wid in f.targets:
                key = f"delay:{f.index}:{wid}"
                if (
                    wid in live
                    and key not in self.fired
                    and f.in_window(step, t_s, self._starts, key)
                ):
                    self.fired.add(key)
                    out.append((f, wid))
        return out

    def coordinator_crash_due(self, step: int) -> ActiveFault | None:
        for f in self._of("coordinator_crash"):
            key = f"coordinator_crash:{f.index}"
            if key not in self.fired and f.spec.at_step is not None and step >= f.spec.at_step:
                self.fired.add(key)
                return f
        return None
