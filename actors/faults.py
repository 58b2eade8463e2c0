"""The fault plan: which injected fault hits which worker, when (pure logic).

Faults are first-class inputs, not ``if testing`` branches: the worker consults its
:class:`WorkerFaults` before and after every gradient (delay, crash, partition), and the
coordinator's receive path consults it for message drops. Targets given as a ``count`` are
resolved once, by the job's seed, against the initial worker ids, so a plan replays the same
way every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        return worker in self.targets

    def in_window(
        self,
        step: int,
        t_s: float,
        starts: dict[str, tuple[int, float]] | None = None,
        key: str = "",
    ) -> bool:
        """Whether a windowed fault (delay, partition) is active at ``step`` / ``t_s``.

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
        """Whether a one-shot fault (crash, drop) fires at this step."""
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


@dataclass
class WorkerFaults:
    """What the plan does to one worker.

    Args:
        faults: the bound faults of the job (all workers).
        worker: this worker's id.
        seed: the job seed; the RNG for delays and probabilities derives from it.
    """

    faults: list[ActiveFault]
    worker: int
    seed: int
    starts: dict[str, tuple[int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng([self.seed, 104729, self.worker])  # fixed salt

    def _mine(self, kind: str) -> list[ActiveFault]:
        return [f for f in self.faults if f.spec.kind == kind and f.hits(self.worker)]

    def delay_s(self, step: int, t_s: float) -> float:
        """Seconds to stall before returning this step's gradient (0 if none)."""
        total = 0.0
        for f in self._mine("delay"):
            if not f.in_window(step, t_s, self.starts, f"delay:{f.index}"):
                continue
            mean_s = f.spec.delay_ms / 1000.0
            if f.spec.distribution == "constant":
                total += mean_s
            elif f.spec.distribution == "exponential":
                total += float(self.rng.exponential(mean_s))
            else:
                # Pareto with shape a and minimum m has mean a m / (a - 1): pick m so that
                # the mean is delay_ms
                a = f.spec.pareto_shape
                m = mean_s * (a - 1.0) / a
                total += float(m * (1.0 + self.rng.pareto(a)))
        return total


def bind_plan(faults: list[FaultSpec], worker_ids: list[int], seed: int) -> list[ActiveFault]:
    """Resolve every fault's targets once, for the whole job."""
    return [
        ActiveFault(f, resolve_targets(f, worker_ids, seed, i), i) for i, f in enumerate(faults)
    ]
