"""The worker's side of the fault plan: what happens to each gradient it computes.

:class:`WorkerFaults` asks every registered kind's
:meth:`~actors.faults.base.FaultType.on_gradient` hook, with the faults that target this
worker, for one :class:`~actors.faults.actions.GradientEffect`: a stall (``delay``) and
corruptions (``corrupt``). The worker corrupts its gradient after computing it and before
compressing and sending it, and stalls before it replies. Draws come from the worker's own
RNG (seeded by the job seed and the worker id), so a plan replays the same way every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actors.faults.actions import NO_EFFECT, GradientEffect
from actors.faults.base import FaultType, Memo
from actors.faults.plan import ActiveFault
from actors.faults.registry import fault_types


@dataclass
class WorkerFaults:
    """What the plan does to one worker.

    Args:
        faults: the bound faults of the job (all workers; replaced when the plan changes).
        worker: this worker's id.
        seed: the job seed; the RNG for delays and probabilities derives from it.
    """

    faults: list[ActiveFault]
    worker: int
    seed: int
    kinds: list[FaultType] = field(default_factory=fault_types)

    def __post_init__(self) -> None:
        self.memo = Memo(rng=np.random.default_rng([self.seed, 104729, self.worker]))  # salt

    def on_gradient(self, step: int, t_s: float) -> GradientEffect:
        """The effect of the plan on this worker's gradient of ``step`` at ``t_s``."""
        effect = NO_EFFECT
        for kind in self.kinds:
            mine = [
                f for f in self.faults if f.spec.kind == kind.kind.value and f.hits(self.worker)
            ]
            if mine:
                effect = effect.then(kind.on_gradient(mine, step, t_s, self.memo))
        return effect

    def delay_s(self, step: int, t_s: float) -> float:
        """Seconds to stall before returning this step's gradient (0 if none)."""
        return self.on_gradient(step, t_s).delay_s
