"""Live measurement of the elastic consistency constant, and its analytic bound per mode.

For every view ``v`` the coordinator hands out it later learns the consistent model ``x`` of
the iteration the view is used at, and records ``B̂ = ||x - v|| / lr`` (gradient units).
With error feedback the consistent model is ``x - lr * mean_i(e_i)`` (the residual memories
are gradient mass not yet applied), so the residuals count as inconsistency.

The bound (derived in docs/consistency.md) is computed from the run's *observed* norms:

* ``G``  max norm of one worker's gradient as the coordinator received it,
* ``G_raw`` max norm of a worker's uncompressed gradient (for the residual bound),
* ``U``  max norm of one applied update divided by lr (``||Δx|| / lr``),

and the settings (``tau``, ``max_lag``, momentum, weight decay, compression factor ``q``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.spec import JobSpec


@dataclass
class ObservedNorms:
    """Running maxima of the norms the bounds are written in."""

    grad_max: float = 0.0  # G
    raw_grad_max: float = 0.0  # G_raw
    update_max: float = 0.0  # U
    lost_fraction_max: float = 0.0  # max over steps of (lost gradients / contributors)
    # U_S: max over applied steps of sum_b ||d_b|| / 1 over parameter blocks, d the update
    # direction (the change is -lr d): the per-block elastic bound's constant
    update_block_sum_max: float = 0.0

    def see_grad(self, sent: float, raw: float) -> None:
        self.grad_max = max(self.grad_max, sent)
        self.raw_grad_max = max(self.raw_grad_max, raw)

    def see_update(self, norm_over_lr: float) -> None:
        self.update_max = max(self.update_max, norm_over_lr)


def elastic_amplification(
    lag: int, momentum: float, weight_decay: float, lr: float, nesterov: bool
) -> float:
    """Worst-case growth of a per-step gradient error over ``lag`` provisional steps.

    A gradient error of norm ``<= D`` in each of ``lag`` optimizer steps moves ``x`` by at
    most ``lr * D * A`` with ``A`` from the recursion (b: momentum buffer error, e: x error
    in units of lr): ``b_m = mu b_{m-1} + D + wd lr e_{m-1}``, ``e_m = e_{m-1} + d_m`` with
    ``d_m = b_m`` (``(1 + mu) b_m`` for Nesterov; ``b_m`` itself without momentum).
    """
    b = e = 0.0
    for _ in range(lag):
        b = momentum * b + 1.0 + weight_decay * lr * e
        e = e + ((1.0 + momentum) * b if nesterov else b)
    return e


def residual_bound(q: float, raw_grad_max: float) -> float:
    """``||e|| <= q/(1-q) G_raw`` for a compressor with ``||C(x) - x|| <= q ||x||``."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return math.inf
    return q / (1.0 - q) * raw_grad_max


def shared_bound_terms(
    spec: JobSpec, norms: ObservedNorms, q: float, error_feedback: bool
) -> float:
    """The terms of the bound every mode shares: missing gradients and error feedback.

    Each mode adds its own term (:meth:`actors.modes.base.Mode.bound_term`).
    """
    opt = spec.optimizer
    base = 0.0
    # lost gradients (dropped messages): per step the applied mean differs from the full one
    # by f ||g_lost|| <= f G (skip) or f ||mean_arrived - mean_lost|| <= 2 f G (substitute),
    # f = lost / contributors (docs: missing gradients)
    if norms.lost_fraction_max > 0.0:
        amp1 = elastic_amplification(1, opt.momentum, opt.weight_decay, opt.lr, opt.nesterov)
        policy = 1.0 if spec.missing_policy == "skip" else 2.0
        base += norms.lost_fraction_max * policy * norms.grad_max * amp1
    if error_feedback:
        base += residual_bound(q, norms.raw_grad_max)
    return base


def analytic_bound(spec: JobSpec, norms: ObservedNorms, q: float, error_feedback: bool) -> float:
    """The bound on B for this run's mode, settings and observed norms (see the docs):
    the mode's term (:mod:`actors.modes`) plus :func:`shared_bound_terms`."""
    # imported here: the modes build on this module (norms, amplification)
    from actors.modes.registry import analytic_bound as bound

    return bound(spec, norms, q, error_feedback)


@dataclass
class ConsistencyMonitor:
    """Collects B̂ samples: max, mean and a bounded time series."""

    max_points: int = 4000
    count: int = 0
    total: float = 0.0
    b_max: float = 0.0
    _series: list[tuple[int, float]] = field(default_factory=list)
    _stride: int = 1
    _last_step: int = 0
    _since: int = 0
    _window_max: float = 0.0

    def record(self, step: int, b_hat: float) -> None:
        self.count += 1
        self.total += b_hat
        self.b_max = max(self.b_max, b_hat)
        # keep the series bounded: when full, halve it and sample half as often,
        # keeping the max of each window so spikes are not lost
        self._window_max = max(self._window_max, b_hat)
        self._last_step = step
        self._since += 1
        if self._since >= self._stride:
            self._series.append((step, self._window_max))
            self._since = 0
            self._window_max = 0.0
            if len(self._series) >= self.max_points:
                self._series = [
                    max(self._series[i : i + 2], key=lambda p: p[1])
                    for i in range(0, len(self._series), 2)
                ]
                self._stride *= 2

    @property
    def series(self) -> list[tuple[int, float]]:
        """``(step, B̂ max of the window)`` points, the still-open window included."""
        if self._since:
            return [*self._series, (self._last_step, self._window_max)]
        return list(self._series)

    @property
    def b_mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def summary(self, bound: float) -> dict[str, Any]:
        ratio = (
            (self.b_max / bound)
            if bound > 0 and math.isfinite(bound)
            else (0.0 if self.b_max == 0 else None)
        )
        return {
            "b_hat_max": self.b_max,
            "b_hat_mean": self.b_mean,
            "bound": bound if math.isfinite(bound) else None,
            "b_hat_over_bound": ratio,
            "views_measured": self.count,
        }


@dataclass
class Meter:
    """B̂ samples: ``||x - v|| / lr`` per view, minus the error-feedback residual mass.

    Args:
        monitor: where samples go (max, mean, series).
        error_feedback: whether workers keep residual memories (they count as inconsistency).
        monitor_interval: measure every n-th view handed out (the spec's ``monitor_interval``).
    """

    monitor: ConsistencyMonitor
    error_feedback: bool
    monitor_interval: int
    # live workers (the mean residual divides by it); a query, set by the coordinator
    live_workers: Callable[[], int] = lambda: 1
    residuals: dict[int, Any] = field(default_factory=dict)  # worker -> np.ndarray memory
    last: float = 0.0
    views_handed: int = 0

    def sample_view(self) -> bool:
        """True for every ``monitor_interval``-th view handed out (the first included)."""
        self.views_handed += 1
        return (self.views_handed - 1) % self.monitor_interval == 0

    def mean_residual(self) -> torch.Tensor | None:
        """``mean_i e_i`` over the live workers (``None`` without error feedback)."""
        if not self.error_feedback or not self.residuals:
            return None
        first = next(iter(self.residuals.values()))
        acc = torch.zeros(len(first), dtype=torch.float64)
        for r in self.residuals.values():
            acc += torch.from_numpy(r)
        return (acc / max(self.live_workers(), 1)).to(torch.float32)

    def measure(self, step: int, diff_over_lr: torch.Tensor | None) -> None:
        """Record ``||(x - v)/lr - mean(e)||`` (``None`` diff: the view was ``x``)."""
        res = self.mean_residual()
        if diff_over_lr is None:
            b = 0.0 if res is None else float(res.norm())
        else:
            b = (
                float((diff_over_lr - res).norm())
                if res is not None
                else float(diff_over_lr.norm())
            )
        self.record(step, b)

    def record(self, step: int, b_hat: float) -> None:
        self.last = b_hat
        self.monitor.record(step, b_hat)
