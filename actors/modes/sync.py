"""``sync``: every live worker's step-k gradient is applied before anyone starts step k+1.

Views are always the model of record, so B = 0 (docs/consistency.md: sync).
"""

from __future__ import annotations

from typing import ClassVar

from typing_extensions import override

from actors.modes.base import ModeContext
from actors.modes.stepped import StepEngine
from actors.scheduling import make_step_rule
from actors.warmup import Constants
from core.spec import JobSpec, SyncMode


class SyncEngine(StepEngine):
    """Fully synchronous steps (:class:`actors.scheduling.SyncRule`)."""

    name: ClassVar[str] = "sync"
    # x changes only while every worker waits, and no gradient slot is reused before its
    # step is applied: views of x are x's own memory, gradients are summed in place
    shares_model_slot: ClassVar[bool] = True

    def __init__(self, ctx: ModeContext) -> None:
        mode = ctx.spec.mode
        assert isinstance(mode, SyncMode)
        super().__init__(ctx, make_step_rule(mode))

    @override
    @classmethod
    def bound_term(cls, spec: JobSpec, c: Constants) -> float:
        return 0.0  # every view is x itself
