"""Missing gradients (a dropped message): what a step applies, the views under ``own``, and
the consistent sequence that B̂ is measured against (docs/consistency.md, "Missing
gradients").

A step expects ``n`` gradients; ``a`` arrived (sum ``S``), ``l = n - a`` were lost. The
spec's ``missing_policy`` decides what stands in for each lost one:

* ``zero_fill``: zero. The model of record applies ``S / n``.
* ``reaverage``: the mean of what arrived. The model of record applies ``S / a``.
* ``own``: in each worker's view, that worker's own gradient ``g_i`` of the same step, so
  worker ``i`` continues from ``x_pre`` stepped with ``(S + l g_i) / n``: the views differ per
  worker, as in the paper's message-passing setting where each node substitutes its own
  gradient. The model of record applies the re-averaged ``S / a``: the coordinator computes
  no gradient of its own, and ``S / a`` is exactly the mean over the arrived workers of
  their own-substituted updates (``mean_i (S + l g_i) / n = S / a``). A worker whose own
  gradient was lost gets the model of record as its view: the coordinator never had that
  gradient (the copy :class:`ShadowModel` uses is the fault injector's, for measuring only).

The *consistent sequence* ``x*`` is the run that lost nothing: every step applies the mean
of every gradient computed for it, lost ones included, through its own copy of the
optimizer state (so momentum's carry-over of a lost share counts). :class:`ShadowModel`
keeps it, from the first lost gradient on (until then it equals the model of record), so a
job that loses nothing pays nothing; one that does pays one more model and momentum copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from actors.optim import RecordOptimizer, Snapshot
from core.spec import MissingPolicy


def divisor(policy: MissingPolicy, arrived: int, lost: int) -> int:
    """What the model of record divides the step's arrived sum by (``>= 1``)."""
    n = arrived + lost if policy == "zero_fill" else arrived
    return max(n, 1)


class ShadowModel:
    """The consistent sequence ``x*`` (see the module docstring).

    Args:
        opt: the model of record's optimizer when the shadow starts (its ``x``, state and
            schedule are copied, not shared).
    """

    def __init__(self, opt: RecordOptimizer) -> None:
        self.opt = opt.clone()

    @property
    def x(self) -> torch.Tensor:
        return self.opt.x

    def apply(self, parts: list[torch.Tensor], count: int) -> None:
        """One step with the mean of ``count`` gradients whose sum is ``sum(parts)``."""
        if count > 0 and parts:
            self.opt.step_many(parts, scale=1.0 / count)


def own_views(
    opt: RecordOptimizer,
    pre: Snapshot,
    arrived_sum: torch.Tensor,
    own: Mapping[int, torch.Tensor],
    lost: int,
) -> dict[int, torch.Tensor]:
    """Each arrived worker's view after a step that lost ``lost`` gradients, under ``own``.

    Args:
        opt: the model of record's optimizer (only its functional
            :meth:`~actors.optim.RecordOptimizer.peek` is used: nothing changes).
        pre: the model of record and its optimizer state *before* the step.
        arrived_sum: ``S``, the sum of the step's arrived gradients.
        own: worker id -> that worker's gradient of the step (the arrived ones).
        lost: ``l``, how many gradients of the step were lost.

    Returns:
        worker id -> ``x_pre`` stepped with ``(S + l g_i) / n``, ``n = len(own) + lost``.
    """
    n = len(own) + lost
    return {
        wid: opt.peek([(arrived_sum.add(g, alpha=float(lost)), 1.0 / n)], start=pre)
        for wid, g in own.items()
    }
