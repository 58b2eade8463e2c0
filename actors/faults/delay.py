"""``delay``: a straggler. The worker stalls before it returns each gradient of a window.

Worker side, every gradient in the window stalls ``delay_ms`` (``constant``), or a draw
with that mean from an exponential or a Pareto distribution (``pareto_shape``: smaller is
heavier-tailed), from the worker's own seeded RNG. Several delays on one worker add up.
Coordinator side, the window's opening is recorded once per target
(:class:`~actors.faults.actions.DelayOn`, key ``delay:<index>:<worker>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from actors.faults.actions import DelayOn, GradientEffect, TickAction
from actors.faults.base import FaultType, Memo, Tick
from actors.faults.plan import ActiveFault
from core.events import FaultKind


class Delay(FaultType):
    kind: ClassVar[FaultKind] = FaultKind.DELAY
    order: ClassVar[int] = 20

    @override
    def on_tick(self, faults: Sequence[ActiveFault], now: Tick, memo: Memo) -> list[TickAction]:
        out: list[TickAction] = []
        for f in faults:
            for wid in f.targets:
                key = f"delay:{f.index}:{wid}"
                if (
                    wid in now.live
                    and key not in memo.fired
                    and f.in_window(now.step, now.t_s, memo.starts, key)
                ):
                    memo.fired.add(key)
                    out.append(DelayOn(wid, f.spec.distribution, f.spec.delay_ms))
        return out

    @override
    def on_gradient(
        self, faults: Sequence[ActiveFault], step: int, t_s: float, memo: Memo
    ) -> GradientEffect:
        total_s = 0.0
        for f in faults:
            if not f.in_window(step, t_s, memo.starts, f"delay:{f.index}"):
                continue
            mean_s = f.spec.delay_ms / 1000.0
            if f.spec.distribution == "constant":
                total_s += mean_s
            elif f.spec.distribution == "exponential":
                total_s += float(memo.rng.exponential(mean_s))
            else:
                # Pareto with shape a and minimum m has mean a m / (a - 1): pick m so that
                # the mean is delay_ms
                a = f.spec.pareto_shape
                m = mean_s * (a - 1.0) / a
                total_s += float(m * (1.0 + memo.rng.pareto(a)))
        return GradientEffect(delay_s=total_s)
