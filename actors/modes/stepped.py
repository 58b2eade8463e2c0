"""The engine the step modes share (``sync``, ``straggler``, ``local``): numbered steps.

Step ``j``'s update is the optimizer step on the mean of the gradients that the workers
*assigned* to ``j`` sent; applying it turns ``x_j`` into ``x_{j+1}``. Steps are applied
strictly in order (:class:`actors.scheduling.StepBook` keeps who holds what), so the model
of record is always the consistent model ``x_c`` (``c`` = steps completed). A mode built on
this engine supplies its start rule (:class:`actors.scheduling.StepRule`) and, if it needs
them, the hooks :meth:`StepEngine.measure_view` and :meth:`StepEngine.before_apply`.

Missing gradients (a dropped message) follow the spec's ``missing_policy``
(:mod:`actors.modes.missing`): ``zero_fill`` divides by the expected count, ``reaverage`` and
``own`` by the count that arrived; under ``own`` each arrived worker's next view of ``x`` is
the step re-applied with its own gradient in place of each missing one. The lost gradients
are kept for the monitor only: from the first one on, a shadow consistent model ``x*``
applies every step with every gradient computed for it, and every view is measured against
``x*`` at the iteration it is used (B̂ = ``||x* - v|| / lr``, cumulative over steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from actors.messages import GradientReply
from actors.modes.base import Applied, Dispatch, Member, Mode, ModeContext, Verdict, ViewKey
from actors.modes.missing import ShadowModel, divisor, own_views
from actors.optim import Snapshot
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
        # -- missing gradients (actors.modes.missing) --
        self.shadow: ShadowModel | None = None  # x*, from the first lost gradient on
        # own: each worker's gradient per open step, and the views of x after a lossy step
        self.step_own: dict[int, dict[int, torch.Tensor]] = {}
        self.own_views: dict[int, tuple[int, torch.Tensor]] = {}  # worker -> (version, view)

    # -- accounting --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.book.completed

    def finished(self) -> bool:
        return self.book.finished()

    def restore(self, step: int) -> None:
        self.book = StepBook(self.total_steps, jumps=self.book.jumps, start_step=step)
        # a rollback restores while the run has state of later steps: forget it
        for book in (self.step_sums, self.step_grads, self.step_losses, self.lost_grads):
            book.clear()
        self.pending_views.clear()
        self.own.clear()
        self.own_norm.clear()
        # the consistent sequence restarts at the checkpoint (the next loss starts x* again)
        self.shadow = None
        self.step_own.clear()
        self.own_views.clear()

    # -- membership --------------------------------------------------------------------------
    def join(self, worker: int) -> None:
        self.book.join(worker)

    def leave(self, worker: int) -> list[int]:
        self.own.pop(worker, None)
        self.own_norm.pop(worker, None)
        self.own_views.pop(worker, None)
        return self.book.leave(worker)

    # -- hooks -------------------------------------------------------------------------------
    def measure_view(self, target: int, worker: int, vec: torch.Tensor, exact: bool) -> None:
        """A sampled view was handed out: measure it now (its iteration is the current one)
        or once ``target`` is done; against ``x*`` once a gradient was lost."""
        if target > self.book.completed:
            self.pending_views.append((target, worker, vec.clone()))
        elif exact and self.shadow is None:
            self.meter.measure(self.step, None)
        else:
            self.meter.measure(self.step, (self.consistent_x() - vec) / self.model.opt.lr)

    def consistent_x(self) -> torch.Tensor:
        """The consistent model of the current iteration: ``x*`` once a gradient was lost,
        the model of record until then."""
        return self.shadow.x if self.shadow is not None else self.model.x

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
            key, vec, exact = self.worker_view(w.id, target)
            if self.meter.sample_view():
                self.measure_view(target, w.id, vec, exact)
            self.book.assign(w.id, target)
            self.own[w.id] = None
            w.state = "busy"
            out.append(Dispatch(w.id, target, key, vec))
        return out

    def worker_view(self, worker: int, target: int) -> tuple[ViewKey, torch.Tensor, bool]:
        """The view ``worker`` gets for ``target``: its own view of ``x`` after a step that
        lost gradients (``own``), else :meth:`step_view`."""
        mine = self.own_views.get(worker)
        if mine is not None and target <= self.book.completed:
            version, view = mine
            if version == self.model.version:
                return ("own", version, worker), view, False
        return self.step_view(target)

    def step_view(self, target: int) -> tuple[ViewKey, torch.Tensor, bool]:
        """The view for ``target``: ``x`` plus provisional partial steps (straggler)."""
        x, opt = self.model.x, self.model.opt
        c = self.book.completed
        if target <= c:
            return ("x", self.model.version), x, True
        parts = []
        steps = []
        for j in range(c, target):
            entry = self.book.open.get(j)
            s = self.step_sums.get(j)
            n = len(entry.assigned) if entry is not None else 1
            parts.append((j, len(entry.arrived) if entry else 0, n))
            steps.append((s if s is not None else torch.zeros_like(x), 1.0 / max(n, 1)))
        v = opt.peek(steps)
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
        if self.spec.missing_policy == "own":
            # a slot the engine sums in lazily is not reused before the step is applied
            kept = grad if self.lazy_sums else grad.clone()
            self.step_own.setdefault(step, {})[w.id] = kept
        w.last_step = step
        self.own[w.id], self.own_norm[w.id] = grad, reply.sent_norm
        return Verdict(accepted=True)

    def on_lost(self, w: Member, reply: GradientReply, grad: torch.Tensor | None) -> bool:
        step = reply.step
        if grad is not None:  # a refused (non-finite) gradient adds nothing to B̂
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
        own = self.step_own.pop(step, {})
        arrived = grads if s is None else [s]
        n_arrived = len(entry.arrived) if arrived else 0
        lost = self.lost_grads.pop(step, [])
        # every gradient the book counts as lost (dropped, or refused as non-finite: only
        # dropped ones have a copy in ``lost`` for x*)
        n = divisor(self.spec.missing_policy, n_arrived, len(entry.lost))
        pre = self._missing_before(arrived, n_arrived, lost, bool(own))
        apply_s: float | None = None
        if n_arrived > 0:
            self.before_apply(step, grads)
            t_apply = time.perf_counter()
            if s is not None:
                opt.step(s, scale=1.0 / n)
            else:
                opt.step_many(grads, scale=1.0 / n)
            apply_s = time.perf_counter() - t_apply
        elif lost:
            # every gradient lost: a zero gradient under any policy, so momentum goes on as
            # in x* (skipping the step would stop it: a gap of the whole momentum)
            opt.step(torch.zeros_like(x))
        self.book.complete(step)
        self.model.version += 1
        if pre is not None:
            self._own_views_after(pre, arrived, own, len(lost))
        else:
            self.own_views.clear()  # a step that lost nothing: every view is x again
        self._measure_pending()
        return Applied(
            loss=float(np.mean(losses)) if losses else math.nan,
            apply_s=apply_s,
            lost_step=step if lost and n_arrived == 0 else None,
        )

    # -- missing gradients (actors.modes.missing) ------------------------------------------
    def _missing_before(
        self, arrived: list[torch.Tensor], n_arrived: int, lost: list[torch.Tensor], own: bool
    ) -> Snapshot | None:
        """Step ``x*`` (started at the first loss) with every gradient of the step; returns
        the model of record's pre-step state if ``own`` views are to be built from it."""
        if lost and self.shadow is None:
            self.shadow = ShadowModel(self.model.opt)
        if self.shadow is not None:
            self.shadow.apply([*arrived, *lost], n_arrived + len(lost))
        if not lost:
            return None
        self.norms.see_lost(len(lost), n_arrived + len(lost))
        if not own or n_arrived == 0:
            return None
        return self.model.opt.snapshot()

    def _own_views_after(
        self,
        pre: Snapshot,
        arrived: list[torch.Tensor],
        own: dict[int, torch.Tensor],
        lost: int,
    ) -> None:
        """``own``: each arrived worker's view of the new ``x`` (see actors.modes.missing)."""
        total = arrived[0] if len(arrived) == 1 else torch.stack(arrived).sum(0)
        views = own_views(self.model.opt, pre, total, own, lost)
        self.own_views = {wid: (self.model.version, v) for wid, v in views.items()}

    def _measure_pending(self) -> None:
        keep = []
        for target, wid, v in self.pending_views:
            if target <= self.book.completed:
                self.meter.measure(self.step, (self.consistent_x() - v) / self.model.opt.lr)
            else:
                keep.append((target, wid, v))
        self.pending_views = keep
