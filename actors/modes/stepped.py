"""The engine the step modes share (``sync``, ``straggler``, ``local``): numbered steps.

Step ``j``'s update is the optimizer step on the mean of the gradients that the workers
*assigned* to ``j`` sent; applying it turns ``x_j`` into ``x_{j+1}``. Steps are applied
strictly in order (:class:`actors.scheduling.StepBook` keeps who holds what), so the model
of record is always the consistent model ``x_c`` (``c`` = steps completed). A mode built on
this engine supplies its start rule (:class:`actors.scheduling.StepRule`) and, if it needs
them, the hooks :meth:`StepEngine.measure_view` and :meth:`StepEngine.before_apply`.

Missing gradients (a dropped message) follow the spec's ``missing_policy``: ``skip``
divides by the expected count (the lost share is left out), ``substitute`` by the count that
arrived (the received mean stands in). The lost gradients are kept for the monitor only,
to measure the B̂ the policy causes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from actors.messages import GradientReply
from actors.modes.base import Applied, Dispatch, Member, Mode, ModeContext, Verdict, ViewKey
from actors.scheduling import StepBook, StepEntry, StepRule


class StepEngine(Mode):
    """Numbered steps applied in order (see the module docstring).

    Args:
        ctx: as for :class:`~actors.modes.base.Mode`.
        rule: when a worker may start its next step.
    """

    def __init__(self, ctx: ModeContext, rule: StepRule) -> None:
        super().__init__(ctx)
        self.rule = rule
        self.book = StepBook(self.total_steps, jumps=rule.jumps)
        # gradients stay where they arrived until the step is applied (no worker
        # overwrites its slot before that), so no running sum is needed
        self.lazy_sums = self.shares_model_slot
        self.step_sums: dict[int, torch.Tensor] = {}
        self.step_grads: dict[int, list[torch.Tensor]] = {}
        self.step_losses: dict[int, list[float]] = {}
        self.pending_views: list[tuple[int, int, torch.Tensor]] = []  # (target, worker, view)
        self.lost_grads: dict[int, list[torch.Tensor]] = {}
        self.own: dict[int, torch.Tensor | None] = {}  # last gradient each worker sent
        self.own_norm: dict[int, float] = {}

    # -- accounting --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.book.completed

    def finished(self) -> bool:
        return self.book.finished()

    def restore(self, step: int) -> None:
        self.book = StepBook(self.total_steps, jumps=self.book.jumps, start_step=step)

    # -- membership --------------------------------------------------------------------------
    def join(self, worker: int) -> None:
        self.book.join(worker)

    def leave(self, worker: int) -> list[int]:
        self.own.pop(worker, None)
        self.own_norm.pop(worker, None)
        return self.book.leave(worker)

    # -- hooks -------------------------------------------------------------------------------
    def measure_view(self, target: int, worker: int, vec: torch.Tensor, exact: bool) -> None:
        """A sampled view was handed out: measure it now (``x``) or once ``target`` is done."""
        if exact:
            self.meter.measure(self.step, None)
        else:
            self.pending_views.append((target, worker, vec.clone()))

    def before_apply(self, step: int, grads: list[torch.Tensor]) -> None:
        """Called with a step's arrived gradients (lazy sums only) before it is applied."""

    # -- scheduling --------------------------------------------------------------------------
    def _received_share(self, worker: int, last: int | None, last_complete: bool) -> float | None:
        """Share of the *other* workers assigned to the worker's last step whose gradients
        arrived (straggler); ``None`` when the step is complete or the mode never jumps."""
        if last_complete or last is None or not self.book.jumps:
            return None
        entry = self.book.open.get(last)
        if entry is None:
            return 1.0
        others = entry.assigned - {worker}
        if not others:
            return 1.0
        return len(entry.arrived & others) / len(others)

    def schedule(self, members: Sequence[Member]) -> list[Dispatch]:
        out: list[Dispatch] = []
        for w in members:
            if w.state not in ("idle", "waiting") or self.book.finished():
                continue
            target = self.book.next_step(w.id)
            if target >= self.total_steps:
                continue
            last = w.last_step
            last_complete = last is None or last < self.book.completed
            d = self.rule.may_start(
                target,
                self.book.oldest_incomplete,
                None if last_complete else self.own_norm.get(w.id, 0.0),
                self._received_share(w.id, last, last_complete),
                last_complete,
            )
            if not d.allowed:
                continue
            key, vec, exact = self.step_view(target)
            if self.meter.sample_view():
                self.measure_view(target, w.id, vec, exact)
            self.book.assign(w.id, target)
            self.own[w.id] = None
            w.state = "busy"
            out.append(Dispatch(w.id, target, key, vec))
        return out

    def step_view(self, target: int) -> tuple[ViewKey, torch.Tensor, bool]:
        """The view for ``target``: ``x`` plus provisional partial steps (straggler)."""
        x, opt = self.model.x, self.model.opt
        c = self.book.completed
        if target <= c:
            return ("x", self.model.version), x, True
        v, buf = x, opt.buf
        parts = []
        for j in range(c, target):
            entry = self.book.open.get(j)
            s = self.step_sums.get(j)
            n = len(entry.assigned) if entry is not None else 1
            parts.append((j, len(entry.arrived) if entry else 0, n))
            g = s if s is not None else torch.zeros_like(x)
            v, buf = opt.peek(v, g, buf, scale=1.0 / max(n, 1))
        return ("p", self.model.version, tuple(parts)), v, False

    # -- replies -----------------------------------------------------------------------------
    def on_reply(self, w: Member, reply: GradientReply, grad: torch.Tensor) -> Verdict:
        step = reply.step
        w.state = "waiting"
        if not self.book.arrive(w.id, step):
            return Verdict(accepted=False, unexpected=True)
        if self.lazy_sums:
            self.step_grads.setdefault(step, []).append(grad)
        elif (s := self.step_sums.get(step)) is None:
            self.step_sums[step] = grad.clone()
        else:
            s.add_(grad)
        self.step_losses.setdefault(step, []).append(reply.loss)
        w.last_step = step
        self.own[w.id], self.own_norm[w.id] = grad, reply.sent_norm
        return Verdict(accepted=True)

    def on_lost(self, w: Member, reply: GradientReply, grad: torch.Tensor) -> bool:
        step = reply.step
        self.lost_grads.setdefault(step, []).append(grad.clone())
        self.book.lose(w.id, step)
        w.state, w.last_step = "waiting", step
        self.own[w.id], self.own_norm[w.id] = None, 0.0
        return True

    # -- applying ----------------------------------------------------------------------------
    def apply_ready(self) -> Iterator[Applied]:
        while (entry := self.book.completable()) is not None:
            yield self._apply(entry)

    def _apply(self, entry: StepEntry) -> Applied:
        step = entry.step
        x, opt = self.model.x, self.model.opt
        s = self.step_sums.pop(step, None)
        grads = self.step_grads.pop(step, [])
        losses = self.step_losses.pop(step, [])
        n_arrived = len(entry.arrived)
        # skip: the lost share is left out; substitute: stand in the received mean
        n = n_arrived + (len(entry.lost) if self.spec.missing_policy == "skip" else 0)
        if entry.lost:
            self._record_lost(step, n_arrived, max(n, 1), grads if s is None else [s])
        apply_s: float | None = None
        if n_arrived > 0 and (s is not None or grads):
            self.before_apply(step, grads)
            t_apply = time.perf_counter()
            if s is not None:
                opt.step(x, s, scale=1.0 / n)
            else:
                opt.step_many(x, grads, scale=1.0 / n)
            apply_s = time.perf_counter() - t_apply
        self.book.complete(step)
        self.model.version += 1
        self._measure_pending()
        return Applied(loss=float(np.mean(losses)) if losses else math.nan, apply_s=apply_s)

    def _measure_pending(self) -> None:
        keep = []
        for target, wid, v in self.pending_views:
            if target <= self.book.completed:
                self.meter.measure(self.step, (self.model.x - v) / self.model.opt.lr)
            else:
                keep.append((target, wid, v))
        self.pending_views = keep

    def _record_lost(
        self, step: int, entry_arrived: int, n_used: int, grads: list[torch.Tensor]
    ) -> None:
        """B̂ of a step that lost gradients: ``||G_full - G_applied||`` with the lost
        gradients (kept for the monitor only) in ``G_full``."""
        lost = self.lost_grads.pop(step, [])
        if not lost or not grads:
            return
        arrived = torch.stack(grads).sum(0)
        full = (arrived + torch.stack(lost).sum(0)) / (entry_arrived + len(lost))
        applied = arrived / n_used
        self.norms.lost_fraction_max = max(
            self.norms.lost_fraction_max, len(lost) / (entry_arrived + len(lost))
        )
        b = float((full - applied).norm())
        self.meter.last = max(self.meter.last, b)
        self.meter.monitor.record(self.step, b)
