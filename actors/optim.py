"""SGD with momentum and weight decay on one flat parameter vector.

The coordinator keeps the model of record as a single flat tensor, so the optimizer is
written for that shape. It follows ``torch.optim.SGD`` (dampening 0) operation for
operation, so a synchronous run matches plain PyTorch to float tolerance, and it has a
*functional* form (:meth:`FlatSGD.peek`) that the elastic mode uses to build a provisional
view from a partial update without touching the model of record.
"""

from __future__ import annotations

from typing import Any

import torch

from core.spec import OptimizerSpec


class FlatSGD:
    """SGD(+momentum, weight decay, Nesterov) over a flat tensor ``x``.

    Args:
        spec: learning rate, momentum, weight decay, nesterov.
    """

    def __init__(self, spec: OptimizerSpec) -> None:
        self.lr = spec.lr
        self.momentum = spec.momentum
        self.weight_decay = spec.weight_decay
        self.nesterov = spec.nesterov
        self.buf: torch.Tensor | None = None
        self.steps = 0

    def _direction(
        self, x: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if scale != 1.0:
            grad = grad.mul(scale)
        d_p = grad.add(x, alpha=self.weight_decay) if self.weight_decay != 0.0 else grad
        if self.momentum == 0.0:
            return d_p, None
        new_buf = d_p.clone() if buf is None else buf.mul(self.momentum).add_(d_p)
        d = d_p.add(new_buf, alpha=self.momentum) if self.nesterov else new_buf
        return d, new_buf

    def step(self, x: torch.Tensor, grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Apply one update with gradient ``scale * grad`` to ``x`` in place.

        The common cases (no Nesterov) run in place over the buffers: this is on the
        coordinator's critical path, once per step, over every parameter.

        Returns:
            The update direction ``d`` (the applied change is ``-lr * d``).
        """
        self.steps += 1
        if self.nesterov:
            d, self.buf = self._direction(x, grad, self.buf, scale)
            x.add_(d, alpha=-self.lr)
            return d
        if self.momentum == 0.0:
            d = grad.mul(scale)
            if self.weight_decay != 0.0:
                d.add_(x, alpha=self.weight_decay)
            x.add_(d, alpha=-self.lr)
            return d
        if self.buf is None:
            self.buf = grad.mul(scale)
        else:
            self.buf.mul_(self.momentum).add_(grad, alpha=scale)
        if self.weight_decay != 0.0:
            self.buf.add_(x, alpha=self.weight_decay)
        x.add_(self.buf, alpha=-self.lr)
        return self.buf

    def step_many(self, x: torch.Tensor, grads: list[torch.Tensor], scale: float) -> None:
        """One update with gradient ``scale * sum(grads)``, without materialising the sum
        when momentum is on (each gradient is folded straight into the momentum buffer)."""
        if not grads:
            return
        if len(grads) == 1 or self.nesterov or self.momentum == 0.0 or self.buf is None:
            total = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
            self.step(x, total, scale)
            return
        self.steps += 1
        self.buf.mul_(self.momentum)
        for g in grads:
            self.buf.add_(g, alpha=scale)
        if self.weight_decay != 0.0:
            self.buf.add_(x, alpha=self.weight_decay)
        x.add_(self.buf, alpha=-self.lr)

    def step_slice(
        self, x: torch.Tensor, grad: torch.Tensor, lo: int, hi: int, scale: float = 1.0
    ) -> float:
        """Apply one update to the slice ``x[lo:hi]`` only, with that slice's gradient
        ``scale * grad`` and its slice of the momentum buffer.

        The optimizer is elementwise, so applying every slice of a partition once is the same
        update as :meth:`step` on the whole vector (a buffer not yet created starts at zero:
        ``mu * 0 + g = g``, the first step's buffer). The per-block elastic mode applies each
        parameter block's update when its gradients are in. ``steps`` is not counted here:
        the caller counts a step once every slice of it is applied.

        Returns:
            The norm of the slice's update direction (the applied change is ``-lr * d``).
        """
        xs = x[lo:hi]
        if self.momentum == 0.0:
            d = grad.mul(scale)
            if self.weight_decay != 0.0:
                d.add_(xs, alpha=self.weight_decay)
            xs.add_(d, alpha=-self.lr)
            return float(d.norm())
        if self.buf is None:
            self.buf = torch.zeros_like(x)
        b = self.buf[lo:hi]
        if self.nesterov:
            d_p = grad.mul(scale)
            if self.weight_decay != 0.0:
                d_p = d_p.add(xs, alpha=self.weight_decay)
            b.mul_(self.momentum).add_(d_p)
            d = d_p.add(b, alpha=self.momentum)
            xs.add_(d, alpha=-self.lr)
            return float(d.norm())
        b.mul_(self.momentum).add_(grad, alpha=scale)
        if self.weight_decay != 0.0:
            b.add_(xs, alpha=self.weight_decay)
        xs.add_(b, alpha=-self.lr)
        return float(b.norm())

    def peek(
        self, x: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The state after one update, on copies: ``(x', buf')``. Nothing here changes."""
        d, new_buf = self._direction(x, grad, buf, scale)
        return x.add(d, alpha=-self.lr), new_buf

    def state_dict(self) -> dict[str, Any]:
        return {"buf": None if self.buf is None else self.buf.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buf = state["buf"]
        self.steps = int(state["steps"])
