"""B̂ of the views a per-block mode hands out, measured block by block.

A view for step ``s`` is the model of record as it is when the worker starts: the blocks
that already applied step ``s - 1`` hold ``x_s``'s value and contribute 0 to ``||v - x_s||``;
a late block is kept (a copy) and compared with its value right after it applies step
``s - 1``. Once every late block has caught up, the view's B̂ is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from actors.consistency import Meter


@dataclass
class _PendingView:
    """A sampled view of step ``target`` whose late blocks are measured as they catch up."""

    target: int
    late: dict[int, torch.Tensor]  # block -> the view's copy of it
    sq: float = 0.0  # sum of squared block differences measured so far


class BlockViews:
    """The sampled views still waiting for late blocks (see the module docstring).

    Args:
        blocks: ``(lo, hi)`` of each parameter block in the flat model.
        meter: where B̂ is recorded.
    """

    def __init__(self, blocks: list[tuple[int, int]], meter: Meter) -> None:
        self.blocks, self.meter = blocks, meter
        self.pending: list[_PendingView] = []

    def handed_out(self, target: int, done: list[int], x: torch.Tensor, step: int) -> None:
        """A view of ``x`` for step ``target`` goes out, the blocks at steps ``done``: keep
        its late blocks, if the meter samples this view (``step``: steps completed)."""
        if not self.meter.sample_view():
            return
        late = {b: x[lo:hi].clone() for b, (lo, hi) in enumerate(self.blocks) if done[b] < target}
        if late:
            self.pending.append(_PendingView(target, late))
        else:
            self.meter.measure(step, None)

    def caught_up(self, b: int, now_at: int, x: torch.Tensor, step: int, lr: float) -> None:
        """Block ``b`` now holds ``x_{now_at}``'s value: measure views of step ``now_at``
        (``lr``: B̂'s unit)."""
        lo, hi = self.blocks[b]
        keep = []
        for pv in self.pending:
            v = pv.late.get(b)
            if v is not None and pv.target == now_at:
                pv.sq += float((x[lo:hi] - v).norm()) ** 2
                del pv.late[b]
            if pv.late:
                keep.append(pv)
            else:
                self.meter.record(step, math.sqrt(pv.sq) / lr)
        self.pending = keep

    def clear(self) -> None:
        """Forget the views out (a restore)."""
        self.pending.clear()
