"""The coordinator's defence against corrupt gradients: only finite values are applied.

Every gradient that reaches the coordinator is screened before it is folded into a step or
applied (:func:`screen_gradient`). A gradient with a NaN or an infinite entry is refused:
it never touches the model of record, is counted, and is recorded as a ``refused`` event;
in the step modes it then counts as missing (the ``missing_policy`` decides, as for a
dropped gradient), in async mode it is simply not applied. The check reads the gradient
itself, never the reply's ``corrupted`` mark (that is the injector's knowledge, kept for
accounting), so a gradient that became non-finite on its own (a diverging run) is refused
the same way.

A *finite* gradient passes, however large: a gradient scaled by a factor is applied. Size
is the consistency guard's business, not this check's.
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch


class GradientVerdict(StrEnum):
    """What the coordinator does with a received gradient."""

    ACCEPT = "accept"  # every entry is finite: fold it in
    REFUSE_NONFINITE = "refuse_nonfinite"  # a NaN or an infinity: never applied


def screen_gradient(grad: torch.Tensor) -> GradientVerdict:
    """Check every entry of ``grad``.

    The fast path is one reduction with no temporary: the sum of a vector is finite only if
    every entry is (a NaN propagates; an infinity gives an infinite sum, or NaN next to one
    of the other sign). ``torch.isfinite(grad).all()`` writes a boolean tensor as long as
    the gradient first and costs ~24x as much (8 ms against 0.34 ms on 1.6M float32 entries
    on one thread: the coordinator's whole per-gradient budget). A non-finite sum of finite
    entries (overflow past float32's 3.4e38) is told apart by the exact check, so the
    verdict is always the entrywise one.
    """
    if math.isfinite(float(grad.sum())) or bool(torch.isfinite(grad).all()):
        return GradientVerdict.ACCEPT
    return GradientVerdict.REFUSE_NONFINITE
