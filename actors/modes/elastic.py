"""``elastic(beta, max_lag)``: the paper's elastic scheduling rule, with a hard lag bound.

A worker that sent its step-j gradient starts the next step once the other step-j gradients
that arrived sum to a vector of norm >= beta x its own (or step j is complete), never more
than ``max_lag`` steps ahead of the oldest incomplete step; its view is the model of record
plus the provisional (partial) updates of the incomplete steps. A worker behind the
frontier jumps to it (:class:`actors.scheduling.ElasticRule`).
"""

from __future__ import annotations

from typing import ClassVar

from typing_extensions import override

from actors.consistency import Constants, elastic_amplification
from actors.modes.base import ModeContext
from actors.modes.stepped import StepEngine
from actors.scheduling import make_step_rule
from core.spec import ElasticMode, JobSpec, ModeSpec


class ElasticEngine(StepEngine):
    """Elastic steps: provisional views, workers run ahead by at most ``max_lag``."""

    name: ClassVar[str] = "elastic"

    def __init__(self, ctx: ModeContext) -> None:
        mode = ctx.spec.mode
        assert isinstance(mode, ElasticMode)
        super().__init__(ctx, make_step_rule(mode))

    @override
    @classmethod
    def bound_term(cls, spec: JobSpec, c: Constants) -> float:
        mode, opt = spec.mode, spec.optimizer
        assert isinstance(mode, ElasticMode)
        # at most max_lag provisional steps, each off by at most 2M (docs: elastic)
        amp = elastic_amplification(
            mode.max_lag, opt.momentum, opt.weight_decay, opt.lr, opt.nesterov
        )
        return 2.0 * c.m * amp

    @override
    def tighten(self) -> ModeSpec | None:
        """Half the lag (the bound grows with it), down to 1; then nothing stricter."""
        mode = self.spec.mode
        assert isinstance(mode, ElasticMode)
        if mode.max_lag <= 1:
            return None
        return mode.model_copy(update={"max_lag": mode.max_lag // 2})

    @override
    def retune(self, setting: ModeSpec) -> int:
        assert isinstance(setting, ElasticMode)
        super().retune(setting)
        self.rule = make_step_rule(setting)
        return 0
