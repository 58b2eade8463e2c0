"""The constants a bound is written in, estimated over a warm-up window and then frozen.

Over the first ``guard.warmup_steps`` steps :class:`WarmupEstimator` measures ``M`` (a bound
on one worker's gradient norm, the root of the second-moment bound), ``sigma`` (the spread of
the workers' gradients of one step around their mean), ``L`` (smoothness, from successive
steps' mean gradients), ``U`` (one step's update in update units) and, for Adam and AdamW,
``M_P`` and ``sigma_P`` (``M`` and ``sigma`` of the gradients preconditioned by Adam's
denominator); then it freezes them into :class:`Constants`, from which every bound is
computed (:mod:`actors.consistency`, docs/consistency.md: "The constants").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Constants:
    """The constants a bound is written in, frozen at the end of the warm-up.

    Attributes:
        m: bound on one worker's gradient norm (root of the second moment bound ``M^2``),
            weight decay included: ``safety x max`` over the warm-up.
        m_raw: the same for the uncompressed gradient (the error-feedback residual term).
        sigma: root of the variance: the workers' gradients of one step around their mean
            (``sqrt(mean_i ||g_i - mean g||^2)``), the warm-up's largest times ``safety``.
        smoothness: ``L``, the largest ``||g_k - g_{k-1}|| / ||x_k - x_{k-1}||`` between
            successive steps' mean gradients (``nan``: never measured). No bound uses it
            yet; it is reported.
        warmup_steps: the window the constants were estimated over.
        frozen_at_step: the step at which they were frozen.
        safety_factor: the factor applied to the warm-up's maxima.
        u: bound on one step's update direction in *update units*, ``||x_k - x_{k+1}|| /
            lr_k`` (``lr_k`` the step's base lr): ``safety x max`` over the warm-up. The
            constant of the bounds for adaptive optimizers (Adam scales each coordinate, so
            ``M`` says little about the step; docs/consistency.md); ``nan``: never measured.
        m_p: ``M`` of the preconditioned gradients ``P g`` (Adam's denominator of the next
            step, :meth:`actors.optim.RecordOptimizer.precondition`): a gradient's size in
            update units, the missing-gradient terms' constant under Adam; ``nan`` for SGD.
        sigma_p: ``sigma`` of the preconditioned gradients of one step; ``nan`` for SGD.
    """

    m: float
    m_raw: float
    sigma: float
    smoothness: float
    warmup_steps: int
    frozen_at_step: int
    safety_factor: float
    u: float = math.nan
    m_p: float = math.nan
    sigma_p: float = math.nan

    def public(self) -> dict[str, float | None]:
        """``{M, sigma, L}`` for the summary (``None`` for a constant never measured)."""
        return {
            "M": self.m,
            "M_raw": self.m_raw,
            "sigma": self.sigma,
            "L": self.smoothness if math.isfinite(self.smoothness) else None,
            "U": self.u if math.isfinite(self.u) else None,
            "M_P": self.m_p if math.isfinite(self.m_p) else None,
            "sigma_P": self.sigma_p if math.isfinite(self.sigma_p) else None,
        }


def _larger(current: float, value: float) -> float:
    """The running maximum of a constant that starts unmeasured (``nan``)."""
    return value if math.isnan(current) else max(current, value)


@dataclass
class _StepSpread:
    """One step's gradients, summed: enough for their mean and their spread."""

    total: torch.Tensor
    sq: float  # sum of ||g_i||^2
    n: int
    p_total: torch.Tensor | None = None  # the same for the preconditioned gradients
    p_sq: float = 0.0


@dataclass
class WarmupEstimator:
    """Estimates :class:`Constants` over the first ``warmup_steps`` steps, then freezes.

    Args:
        warmup_steps: the window (steps of the model of record).
        safety_factor: multiplies the warm-up's maxima (see :class:`core.spec.GuardSpec`).
        weight_decay: the optimizer's; ``wd x ||x||`` is part of every applied gradient.
        per_message_steps: gradients one message sums (``H`` for local SGD, else 1); the
            per-step gradient norm is taken as the message's norm over it.
    """

    warmup_steps: int
    safety_factor: float
    weight_decay: float = 0.0
    per_message_steps: int = 1
    start_step: int = 0  # the window is [start_step, start_step + warmup_steps)
    grad_max: float = 0.0
    raw_max: float = 0.0
    x_max: float = 0.0
    sigma_max: float = 0.0
    l_max: float = math.nan
    u_max: float = math.nan  # largest ||x_k - x_{k+1}|| / lr_k seen (update units)
    p_max: float = math.nan  # largest ||P g|| (Adam: preconditioned gradient)
    sigma_p_max: float = 0.0  # as sigma_max; stated only if p_max was measured
    frozen: Constants | None = None
    finite: bool = True  # every gradient seen in the warm-up was finite
    _open: dict[int, _StepSpread] = field(default_factory=dict)
    _prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, mean gradient) of a step
    _last_x: torch.Tensor | None = None  # x at the previous step_done (for U)

    def see_grad(
        self,
        step: int,
        grad: torch.Tensor,
        sent: float,
        raw: float,
        pre: torch.Tensor | None = None,
    ) -> None:
        """One worker's gradient of ``step`` (ignored once frozen); ``pre``: the same
        gradient preconditioned (Adam), or ``None``."""
        if self.frozen is not None:
            return
        if not (math.isfinite(sent) and math.isfinite(raw)):
            self.finite = False
            return
        h = max(self.per_message_steps, 1)
        self.grad_max = max(self.grad_max, sent / h)
        self.raw_max = max(self.raw_max, raw / h)
        p = None if pre is None else pre.to(torch.float64)
        p_sq = 0.0
        if p is not None:
            p_sq = float(p.dot(p))
            pn = math.sqrt(p_sq) / h
            self.p_max = _larger(self.p_max, pn)
        acc = self._open.get(step)
        g = grad.to(torch.float64)
        if acc is None:
            self._open[step] = _StepSpread(
                g.clone(), sent * sent, 1, None if p is None else p.clone(), p_sq
            )
        else:
            acc.total += g
            acc.sq += sent * sent
            acc.n += 1
            if p is not None and acc.p_total is not None:
                acc.p_total += p
                acc.p_sq += p_sq

    def step_done(self, step: int, x: torch.Tensor, lr: float | None = None) -> Constants | None:
        """Steps before ``step`` are complete at model ``x``; returns the constants when
        this freezes them (``None`` otherwise, and always once frozen).

        Args:
            lr: the base lr of the step just applied (``None``: ``U`` is not measured).
        """
        if self.frozen is not None:
            return None
        self.x_max = max(self.x_max, float(x.norm()))
        if lr is not None and lr > 0.0:
            if self._last_x is not None:
                u = float((x - self._last_x).norm()) / lr
                self.u_max = _larger(self.u_max, u)
            self._last_x = x.clone()
        for s in sorted(k for k in self._open if k < step):
            self._close(self._open.pop(s), x)
        if step < self.start_step + self.warmup_steps:
            return None
        return self.freeze(step)

    def _close(self, acc: _StepSpread, x: torch.Tensor) -> None:
        if acc.n >= 2:
            mean = acc.total / acc.n
            # mean_i ||g_i - mean||^2 = mean_i ||g_i||^2 - ||mean||^2 (>= 0 up to rounding)
            var = max(acc.sq / acc.n - float(mean.dot(mean)), 0.0)
            self.sigma_max = max(self.sigma_max, math.sqrt(var) / self.per_message_steps)
            if acc.p_total is not None:
                pm = acc.p_total / acc.n
                p_var = max(acc.p_sq / acc.n - float(pm.dot(pm)), 0.0)
                sp = math.sqrt(p_var) / self.per_message_steps
                self.sigma_p_max = max(self.sigma_p_max, sp)
        mean = acc.total / acc.n
        if self._prev is not None:
            px, pg = self._prev
            dx = float((x.to(torch.float64) - px).norm())
            if dx > 0.0:
                l_k = float((mean - pg).norm()) / dx
                self.l_max = _larger(self.l_max, l_k)
        self._prev = (x.to(torch.float64).clone(), mean)

    def freeze(self, step: int) -> Constants:
        """Freeze the constants now (at ``step``)."""
        k = self.safety_factor
        wd_term = self.weight_decay * k * self.x_max
        self.frozen = Constants(
            m=k * self.grad_max + wd_term,
            m_raw=k * self.raw_max + wd_term,
            sigma=k * self.sigma_max,
            smoothness=self.l_max,
            warmup_steps=self.warmup_steps,
            frozen_at_step=step,
            safety_factor=k,
            u=k * self.u_max,
            m_p=k * self.p_max,
            sigma_p=k * self.sigma_p_max if math.isfinite(self.p_max) else math.nan,
        )
        self._open.clear()
        self._prev = None
        self._last_x = None
        return self.frozen
