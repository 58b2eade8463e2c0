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

from enum import StrEnum

import torch


class GradientVerdict(StrEnum):
    """What the coordinator does with a received gradient."""

    ACCEPT = "accept"  # every entry is finite: fold it in
    REFUSE_NONFINITE = "refuse_nonfinite"  # a NaN or an infinity: never applied


def screen_gradient(grad: torch.Tensor) -> GradientVerdict:
    """Check every entry of ``grad`` (one pass over it)."""
    if bool(torch.isfinite(grad).all()):
        return GradientVerdict.ACCEPT
    return GradientVerdict.REFUSE_NONFINITE
