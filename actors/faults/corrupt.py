"""``corrupt``: a worker's gradient becomes non-finite, or is scaled, for a window.

Worker side (:meth:`Corrupt.on_gradient`): every gradient computed in the window (at
``at_step`` / ``at_s`` for ``duration_steps`` / ``duration_s``, or the whole run), or each
with ``probability``, is corrupted after it is computed and before it is compressed and
sent: ``nan`` / ``inf`` set every entry, ``scale`` multiplies by ``scale_factor``. The reply
is marked ``corrupted`` (the injector's knowledge, for accounting only; the coordinator's
defence never reads it). Coordinator side, the window's opening is recorded once per
target (:class:`~actors.faults.actions.CorruptOn`, key ``corrupt:<index>:<worker>``).

The defence is the coordinator's: every received gradient is checked for finite values
(:func:`actors.faults.screen.screen_gradient`), and a non-finite one is refused, never
applied. A scaled gradient is finite and *is* applied; the finite-value check does not
catch it (a consistency guard on the update's size is the defence against that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from actors.faults.actions import (
    NO_EFFECT,
    Corruption,
    CorruptOn,
    GradientEffect,
    TickAction,
)
from actors.faults.base import FaultType, Memo, Tick
from actors.faults.plan import ActiveFault
from core.events import FaultKind


def corruption_of(f: ActiveFault) -> Corruption:
    """The corruption a ``corrupt`` fault applies (the spec guarantees its fields)."""
    name = f.spec.corruption
    assert name is not None, "a corrupt fault's spec names its corruption"
    factor = f.spec.scale_factor if f.spec.scale_factor is not None else 1.0
    return Corruption(name, factor)


class Corrupt(FaultType):
    kind: ClassVar[FaultKind] = FaultKind.CORRUPT
    order: ClassVar[int] = 40

    @override
    def on_tick(self, faults: Sequence[ActiveFault], now: Tick, memo: Memo) -> list[TickAction]:
        out: list[TickAction] = []
        for f in faults:
            for wid in f.targets:
                key = f"corrupt:{f.index}:{wid}"
                if (
                    wid in now.live
                    and key not in memo.fired
                    and f.in_window(now.step, now.t_s, memo.starts, key)
                ):
                    memo.fired.add(key)
                    c = corruption_of(f)
                    factor = c.scale_factor if c.name == "scale" else None
                    out.append(CorruptOn(wid, c.name, factor, f.spec.probability))
        return out

    @override
    def on_gradient(
        self, faults: Sequence[ActiveFault], step: int, t_s: float, memo: Memo
    ) -> GradientEffect:
        effect = NO_EFFECT
        for f in faults:
            if not f.in_window(step, t_s, memo.starts, f"corrupt:{f.index}"):
                continue
            p = f.spec.probability
            if p is not None and not memo.rng.random() < p:
                continue
            effect = effect.then(GradientEffect(corruptions=(corruption_of(f),)))
        return effect
