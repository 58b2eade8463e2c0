"""``local(H)``: local SGD. Each worker takes H plain SGD steps on its own replica per round.

A round starts every live worker on the model of record ``x``. Worker ``i`` runs
``y_{t+1} = y_t - lr g_i(y_t)`` from ``y_0 = x`` for ``t < H`` on its own batches (plain SGD:
no momentum, no weight decay on the replica) and sends ``p_i = (x - y_H) / lr``, the sum of
its H local gradients. When every live worker's ``p_i`` is in, the coordinator applies the
mean ``p = mean_i p_i`` as one gradient through the job's optimizer, so momentum and weight
decay act once per round, on the averaged pseudo-gradient. With plain SGD that sets ``x``
to the average of the replicas; with ``H = 1`` it is exactly ``sync``.

Accounting: a round is one *step*, as in every other mode a step is one update of the model
of record; ``steps: 300`` runs 300 rounds (each worker takes 300 x H local steps and draws
300 x H batches). Given in ``epochs``, the step count assumes one batch per worker per step,
so a local job reads its data H times as often.

B̂ is measured at the end of each round, before averaging, where the replicas are farthest
apart: ``max_i ||mean_j y_j - y_i|| / lr = max_i ||p_i - mean_j p_j||`` (the average of the
replicas is the consistent model for plain SGD). Its bound (docs/consistency.md: local) is
``2 H M``, with ``M`` the frozen bound on one local gradient's norm (``||p_i|| <= H M``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from typing_extensions import override

from actors.modes.base import ModeContext
from actors.modes.stepped import StepEngine
from actors.scheduling import SyncRule
from actors.warmup import Constants
from core.spec import JobSpec, LocalMode, ModeSpec


class LocalEngine(StepEngine):
    """Local SGD rounds (see the module docstring)."""

    name: ClassVar[str] = "local"
    # a round is applied only when every worker waits (as in sync)
    shares_model_slot: ClassVar[bool] = True

    def __init__(self, ctx: ModeContext) -> None:
        mode = ctx.spec.mode
        assert isinstance(mode, LocalMode)
        self.h = mode.local_steps
        super().__init__(ctx, SyncRule())

    @override
    def local_steps(self) -> int:
        return self.h

    @override
    def measure_view(self, target: int, worker: int, vec: torch.Tensor, exact: bool) -> None:
        """Views are ``x`` itself: the inconsistency is measured at the round's end."""

    @override
    def before_apply(self, step: int, grads: list[torch.Tensor]) -> None:
        if not grads or step % self.spec.monitor_interval != 0:
            return
        p = torch.stack(grads)
        spread = (p - p.mean(0)).norm(dim=1)  # ||p_i - mean p|| = ||mean y - y_i|| / lr
        self.meter.record(step, float(spread.max()))

    @override
    @classmethod
    def bound_term(cls, spec: JobSpec, c: Constants) -> float:
        mode = spec.mode
        assert isinstance(mode, LocalMode)
        # ||p_i - mean_j p_j|| <= ||p_i|| + max_j ||p_j|| <= 2 H M (docs: local)
        return 2.0 * mode.local_steps * c.m

    @override
    def tighten(self) -> ModeSpec | None:
        """Half the local steps (the bound is linear in H), down to 1 (sync)."""
        mode = self.spec.mode
        assert isinstance(mode, LocalMode)
        if mode.local_steps <= 1:
            return None
        return mode.model_copy(update={"local_steps": mode.local_steps // 2})

    @override
    def retune(self, setting: ModeSpec) -> int:
        assert isinstance(setting, LocalMode)
        super().retune(setting)
        self.h = setting.local_steps  # from the next round on
        return 0
