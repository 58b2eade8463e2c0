"""Live measurement of the elastic consistency constant, and its bound stated in advance.

For every view ``v`` the coordinator hands out it later learns the consistent model ``x`` of
the iteration the view is used at, and records ``B̂ = ||x - v|| / lr`` (gradient units).
With error feedback the consistent model is ``x - lr * mean_i(e_i)`` (the residual memories
are gradient mass not yet applied), so the residuals count as inconsistency.

The bound (derived in docs/consistency.md) is *stated before it is tested*: over a warm-up
window (``guard.warmup_steps``) :class:`~actors.warmup.WarmupEstimator` estimates the
constants the theory needs (:class:`~actors.warmup.Constants`: ``M`` bounding the
gradient's norm, ``sigma`` the spread of the workers' gradients of one step, ``L`` the
smoothness), then freezes them; the bound is a
function of those frozen constants and the settings (``tau``, ``max_lag``, momentum, weight
decay, the drop fraction, compression factor ``q``, ``H``), never of norms seen later, so a
run whose gradients blow up does not carry its bound up with it. The verdict compares the
*mean* B̂ over a window (:attr:`ConsistencyMonitor.window_mean`) with it, as the paper's
condition is on an expectation (Nadiradze et al., Elastic Consistency, AAAI 2021:
``E||x_t - v_t||^2 <= alpha^2 B^2``).

:class:`ObservedNorms` keeps the running maxima of the norms for the summary only.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.schedules import lr_ratio
from actors.warmup import Constants
from core.spec import FaultSpec, JobSpec


@dataclass
class ObservedNorms:
    """Running maxima of the norms the run saw (reported; the bound does not use them)."""

    grad_max: float = 0.0  # G
    raw_grad_max: float = 0.0  # G_raw
    update_max: float = 0.0  # U
    lost_fraction_max: float = 0.0  # max over steps of (lost gradients / contributors)
    # -- missing gradients: the cumulative bound's sums (docs/consistency.md) --
    lost_fraction_sum: float = 0.0  # sum over steps where some arrived of f_j
    lost_fraction_sq_sum: float = 0.0  # ... of f_j^2
    all_lost_steps: int = 0  # steps whose every gradient was lost (f = 1, nothing stands in)

    def see_lost(self, lost: int, expected: int) -> None:
        """A step lost ``lost`` of its ``expected`` gradients."""
        if lost <= 0 or expected <= 0:
            return
        f = lost / expected
        self.lost_fraction_max = max(self.lost_fraction_max, f)
        if lost >= expected:
            self.all_lost_steps += 1
        else:
            self.lost_fraction_sum += f
            self.lost_fraction_sq_sum += f * f

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


def drop_fraction(drops: Sequence[FaultSpec | list[int]], workers: int) -> float:
    """The largest share of a step's gradients the drop faults can lose (from the plan).

    Args:
        drops: each drop fault as its spec (targets: ``workers``, ``count`` or all) or as
            its resolved target list.
        workers: the job's workers.
    """
    lost = 0
    for d in drops:
        if isinstance(d, list):
            lost += len(d)
        elif d.workers is not None:
            lost += len(d.workers)
        else:
            lost += d.count if d.count is not None else workers
    return min(1.0, lost / max(workers, 1))


def residual_bound(q: float, m_raw: float) -> float:
    """``||e|| <= q/(1-q) M_raw`` for a compressor with ``||C(x) - x|| <= q ||x||``."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return math.inf
    return q / (1.0 - q) * m_raw


# -- missing gradients: one step's error per policy (docs/consistency.md, "Missing
# gradients"). f = lost / expected gradients of the step; M bounds a gradient's norm (its
# second moment: E||g||^2 <= M^2), sigma its noise (E||g - grad F||^2 <= sigma^2). Each is
# the root-mean-square distance, in gradient units, between the step a view was built with
# and the step of the consistent sequence (every gradient, lost ones included).


def missing_term_zero_fill(f: float, m: float) -> float:
    """``zero_fill``: the lost share ``(l/n) mean_lost g`` is missing whole: ``f M``."""
    return f * m


def missing_term_reaverage(f: float, sigma: float) -> float:
    """``reaverage``: ``(l/n)(mean_arrived - mean_lost)``, two independent means of unbiased
    gradients: ``E||.||^2 = sigma^2 (1/a + 1/l) <= 2 sigma^2``, so ``sqrt(2) f sigma``."""
    return math.sqrt(2.0) * f * sigma


def missing_term_own(f: float, sigma: float) -> float:
    """``own``: worker ``i``'s view misses ``(l/n)(g_i - mean_lost)``: ``E||.||^2 = sigma^2
    (1 + 1/l) <= 2 sigma^2``, so ``sqrt(2) f sigma`` (a worker whose own gradient was lost
    holds the re-averaged model, within the same term)."""
    return math.sqrt(2.0) * f * sigma


def momentum_gain(momentum: float) -> float:
    """How far one gradient error of norm 1 moves ``x``, in units of lr, over all later
    steps: momentum keeps applying it, ``1 + mu + mu^2 + ... = 1 / (1 - mu)`` (the same for
    Nesterov; 1 without momentum). Weight decay only pulls the error back (its term enters
    the update with the error's opposite sign), so it never exceeds this."""
    return 1.0 / (1.0 - momentum)


def adam_moment_gain(beta1: float, steps: int) -> float:
    """How far one gradient error ``delta`` of step ``j`` moves ``x`` under Adam, in units
    of ``lr ||P delta||`` (``P`` Adam's per-coordinate denominator, taken as common to the
    two sequences), over all later steps: ``delta`` enters the first moment with weight
    ``1 - beta1`` and decays by ``beta1`` a step, and the bias correction divides step
    ``k``'s moment by ``1 - beta1^k``, so the gain is ``sum_{k>=j} (1 - beta1) beta1^(k-j) /
    (1 - beta1^k)``, largest for ``j = 1`` (bias correction amplifies early steps). 1 for
    ``beta1 = 0``; about 3.0 for 0.9 over 300 steps (docs/consistency.md, "Adaptive optimizers").

    Args:
        beta1: Adam's first-moment decay.
        steps: the run's steps (the sum ends there).
    """
    total, w = 0.0, 1.0 - beta1  # w = (1 - beta1) beta1^(k-1)
    for k in range(1, max(steps, 1) + 1):
        total += w / (1.0 - beta1**k)
        w *= beta1
        if w < 1e-12:
            break
    return total


def missing_term(policy: str, f: float, m: float, sigma: float) -> float:
    """The per-step missing-gradient term of ``policy`` (one of the functions above)."""
    if policy == "zero_fill":
        return missing_term_zero_fill(f, m)
    if policy == "reaverage":
        return missing_term_reaverage(f, sigma)
    return missing_term_own(f, sigma)


def cumulative_missing_term(
    policy: str, norms: ObservedNorms, m: float, sigma: float, gain: float
) -> float:
    """The bound on ``||x* - v|| / lr`` after every step lost so far (docs/consistency.md).

    ``x*`` and the model of record apply the same gradients but for the missing shares, so
    their gap is the sum of the per-step terms, each moved on by momentum (``gain``). The
    ``zero_fill`` pieces can all point the same way (each misses a share of the gradient's
    mean): they add up, ``gain * sum_j f_j M``. The ``reaverage`` pieces have mean zero
    given the past (an unbiased mean stands in for an unbiased mean): they add in quadrature,
    ``gain * sqrt(2 sum_j f_j^2) sigma``, a root-mean-square bound. ``own``'s model of record
    re-averages, and each view adds its own one-step substitution. A step that lost every
    gradient had nothing to stand in: the whole gradient, ``gain * M``, under any policy.

    Args:
        policy: the spec's ``missing_policy``.
        norms: the sums of lost fractions so far.
        m: bound on a gradient's norm (second moment).
        sigma: bound on a gradient's noise.
        gain: :func:`momentum_gain` of the optimizer.
    """
    whole = norms.all_lost_steps * missing_term_zero_fill(1.0, m)
    if policy == "zero_fill":
        shares = missing_term_zero_fill(norms.lost_fraction_sum, m)
    else:
        shares = missing_term_reaverage(math.sqrt(norms.lost_fraction_sq_sum), sigma)
    own_view = missing_term_own(norms.lost_fraction_max, sigma) if policy == "own" else 0.0
    return gain * (shares + whole) + own_view


def shared_bound_terms(
    spec: JobSpec,
    c: Constants,
    q: float,
    error_feedback: bool,
    lost_fraction: float,
    total_steps: int = 0,
) -> float:
    """The terms of the bound every mode shares: missing gradients and error feedback.

    Each mode adds its own term (:meth:`actors.modes.base.Mode.bound_term`).

    Args:
        spec: the job (optimizer, missing policy).
        c: the frozen constants.
        q: the compressor's error factor.
        error_feedback: workers keep residual memories.
        lost_fraction: the largest share of a step's gradients the fault plan may drop
            (:func:`drop_fraction`).
        total_steps: the job's steps (the missing shares accumulate over them).
    """
    base = 0.0
    opt = spec.applied_optimizer()
    if opt.adaptive:
        # Adam: a lost share moves x by its preconditioned size, P delta, spread over later
        # steps by the first moment (adam_moment_gain); the constants are the warm-up's
        # preconditioned ones (docs: adaptive optimizers)
        gain = adam_moment_gain(opt.adam_betas[0], total_steps)
        m, sigma = c.m_p, c.sigma_p
    else:
        gain = momentum_gain(opt.momentum)
        m, sigma = c.m, c.sigma
    # lost gradients (dropped messages): B̂ is measured against the consistent sequence x*
    # (every computed gradient applied), so the missing shares accumulate over the run
    # (:func:`cumulative_missing_term`). Stated in advance from the plan: at most a share
    # f = lost_fraction of every step's gradients is lost, over the job's total_steps K, so
    # sum_j f_j <= K f and sum_j f_j^2 <= K f^2; the constants are the frozen M and sigma
    # (docs: missing gradients). A worst case over the whole run: loose early on.
    if lost_fraction > 0.0:
        k = float(max(total_steps, 1))
        planned = ObservedNorms(
            lost_fraction_max=lost_fraction,
            lost_fraction_sum=k * lost_fraction,
            lost_fraction_sq_sum=k * lost_fraction * lost_fraction,
        )
        missing = cumulative_missing_term(spec.missing_policy, planned, m, sigma, gain)
        # the gap accumulates over the whole run at each step's lr; B̂ divides it by the
        # current lr: times the schedule's largest earlier-to-current ratio (docs: the lr
        # schedule)
        base += missing * lr_ratio(opt, total_steps, None)
    if error_feedback:
        # in gradient units under every optimizer: the consistent model is x - lr mean(e),
        # the mass the memories hold back (Meter), and the compressor's contraction does
        # not involve the optimizer
        base += residual_bound(q, c.m_raw)
    return base


@dataclass
class ConsistencyMonitor:
    """Collects B̂ samples: max, mean, the mean of the last ``window`` samples (the
    verdict's) and a bounded time series."""

    max_points: int = 4000
    window: int = 50
    count: int = 0
    total: float = 0.0
    b_max: float = 0.0
    _series: list[tuple[int, float]] = field(default_factory=list)
    _stride: int = 1
    _last_step: int = 0
    _since: int = 0
    _window_max: float = 0.0
    _recent: deque[float] = field(default_factory=deque)

    def record(self, step: int, b_hat: float) -> None:
        self.count += 1
        self.total += b_hat
        self._recent.append(b_hat)
        while len(self._recent) > self.window:
            self._recent.popleft()
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

    @property
    def window_full(self) -> bool:
        """The window holds ``window`` samples (the verdict judges only then)."""
        return len(self._recent) >= self.window

    @property
    def window_mean(self) -> float | None:
        """Mean of the last ``window`` samples (``None``: none yet)."""
        return statistics.fmean(self._recent) if self._recent else None

    def reset_window(self) -> None:
        """Start a new window (after the setting changed: judge the new one afresh)."""
        self._recent.clear()

    def summary(self, bound: float | None) -> dict[str, Any]:
        """B̂ against ``bound`` (``None``: not stated yet): ``ratio`` is the mean's, the
        verdict's quantity; ``b_hat_over_bound`` the max's, reported beside it."""
        stated = bound is not None and math.isfinite(bound)

        def over(v: float) -> float | None:
            if stated and bound is not None and bound > 0:
                return v / bound
            return 0.0 if stated and v == 0 else None

        return {
            "b_hat_max": self.b_max,
            "b_hat_mean": self.b_mean,
            "b_hat_window_mean": self.window_mean,
            "bound": bound if stated else None,
            "ratio": over(self.b_mean),
            "b_hat_over_bound": over(self.b_max),
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


def adam_coordinate_bound(beta1: float, beta2: float, steps: int) -> float:
    """The largest ``|m_hat / sqrt(v_hat)|`` of one coordinate over Adam's first ``steps``
    steps, whatever the gradients (``eps`` only makes the update smaller).

    With ``m_t = (1 - b1) sum_s b1^(t-s) g_s`` and ``v_t = (1 - b2) sum_s b2^(t-s) g_s^2``,
    Cauchy-Schwarz gives ``|m_t| <= (1 - b1) sqrt(S_t v_t / (1 - b2))`` with
    ``S_t = sum_{j<t} (b1^2 / b2)^j``; with the bias corrections ``m_hat = m_t / (1 - b1^t)``,
    ``v_hat = v_t / (1 - b2^t)``: ``A_t = (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) S_t /
    (1 - b2))``, reached by a gradient history ``g_s ~ (b1 / b2)^(t-s)``. For the defaults
    (0.9, 0.999) it tends to 7.27; the L2 norm of an update of ``d`` coordinates is at most
    ``A sqrt(d)`` (docs/consistency.md, "Adaptive optimizers").
    """
    if beta2 == 0.0:
        # v_hat is the last g^2 alone: m_hat / |g_t| is 1 without momentum, else unbounded
        return 1.0 if beta1 == 0.0 else math.inf
    gamma = beta1 * beta1 / beta2
    best, s = 0.0, 0.0
    b1t = b2t = 1.0
    for _ in range(max(steps, 1)):
        s = 1.0 + gamma * s
        b1t, b2t = b1t * beta1, b2t * beta2
        a = (1.0 - beta1) / (1.0 - b1t) * math.sqrt((1.0 - b2t) * s / (1.0 - beta2))
        best = max(best, a)
    return best
