"""The fault plan bound to a job: which injected fault hits which worker, when (pure logic).

A :class:`~core.spec.FaultSpec` says what to inject; :func:`bind_plan` resolves its targets
once per job and numbers it (its ``index`` keys its firings, see
:mod:`actors.faults.engine`). Targets given as a ``count`` are drawn by the job's seed
against the initial worker ids, so a plan replays the same way every run.
:class:`ActiveFault` answers the two timing questions every kind asks: is its window open
(:meth:`ActiveFault.in_window`), and does a one-shot trigger fire now
(:meth:`ActiveFault.triggers_at`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.spec import FaultSpec


def resolve_targets(fault: FaultSpec, worker_ids: list[int], seed: int, index: int) -> list[int]:
    """The workers a fault hits: its explicit ids, or ``count`` drawn by the seed."""
    if fault.workers is not None:
        return list(fault.workers)
    if fault.count is not None:
        rng = np.random.default_rng([seed, 7919, index])  # 7919: any fixed salt
        k = min(fault.count, len(worker_ids))
        return sorted(int(w) for w in rng.choice(worker_ids, size=k, replace=False))
    return list(worker_ids)


@dataclass
class ActiveFault:
    """A fault bound to its targets."""

    spec: FaultSpec
    targets: list[int]
    index: int

    def hits(self, worker: int) -> bool:
        """Whether ``worker`` is one of the fault's targets."""
        return worker in self.targets

    def in_window(
        self,
        step: int,
        t_s: float,
        starts: dict[str, tuple[int, float]] | None = None,
        key: str = "",
    ) -> bool:
        """Whether a windowed fault (delay, partition, corrupt) is active at ``step`` / ``t_s``.

        The window opens at ``at_step`` or ``at_s`` (or at once) and lasts ``duration_steps``
        or ``duration_s`` (or forever). A window whose length is in the other unit than its
        trigger remembers where it opened in ``starts[key]``.
        """
        f = self.spec
        opened = (t_s >= f.at_s) if f.at_s is not None else (step >= (f.at_step or 0))
        if not opened:
            return False
        if f.duration_s is None and f.duration_steps is None:
            return True
        if f.at_s is not None and f.duration_s is not None:
            return t_s < f.at_s + f.duration_s
        if f.at_s is None and f.duration_steps is not None:
            return step < (f.at_step or 0) + f.duration_steps
        # mixed units: remember the opening point
        memo = starts if starts is not None else {}
        s0, t0 = memo.setdefault(key, (step, t_s))
        if f.duration_s is not None:
            return t_s < t0 + f.duration_s
        assert f.duration_steps is not None
        return step < s0 + f.duration_steps

    def triggers_at(self, step: int, t_s: float, rng: np.random.Generator) -> bool:
        """Whether a one-shot fault (crash) fires at this step."""
        f = self.spec
        if f.steps is not None:
            return step in f.steps
        if f.probability is not None:
            return bool(rng.random() < f.probability)
        if f.at_step is not None:
            return step >= f.at_step
        if f.at_s is not None:
            return t_s >= f.at_s
        return False


def bind_plan(faults: list[FaultSpec], worker_ids: list[int], seed: int) -> list[ActiveFault]:
    """Resolve every fault's targets once, for the whole job."""
    return [
        ActiveFault(f, resolve_targets(f, worker_ids, seed, i), i) for i, f in enumerate(faults)
    ]
