"""``elastic(beta, max_lag)``: the paper's elastic rule, applied per parameter block.

Following the authors' code (their Horovod fork, ``horovod/torch/broken_barrier.py``: each
layer's gradient is all-reduced on its own, and a worker's pre-forward hooks stop waiting
once the layers whose averaged update arrived make up a share of a target), the unit of
communication and of application here is a **parameter block** (one parameter tensor of
the model, :class:`actors.flat.ParamLayout`):

* A worker sends its step-k gradient block by block as backward produces it (on the
  same-host path: each block is written into its shared-memory slot and announced by a
  small :class:`actors.messages.BlockReady` frame before the final reply; over the object
  store every block arrives with the reply).
* The coordinator adds each arrived block into the step's sum, and applies block b's
  averaged step-k update (:meth:`actors.optim.RecordOptimizer.step_block`: ``torch.optim``
  with ``.grad`` set for that parameter only, at step k's lr; exact, as SGD, Adam and AdamW
  update each parameter from its own gradient and state) once every gradient step k
  expects has delivered block b (or is known lost) and step k can get no new contributor.
  Each block applies its steps in order; different blocks may be at different steps (the
  late ones catch up as their gradients arrive). With ``clip_grad_norm`` the clip needs
  the global norm of the whole averaged gradient, so a step's blocks apply together, once
  all of them are in (blocks still stream in early; the share rule then sees a step as
  applied whole or not at all).
* A worker starts step k+1 once ``sum_{b applied} ||g_own,b|| >= beta * sum_b ||g_own,b||``
  over the per-block L2 norms of its own step-k gradient
  (:class:`actors.scheduling.BlockShareRule`), never more than ``max_lag`` steps ahead of
  the oldest incomplete step. Its view is the model of record as it is: the blocks whose
  step-k update is late lack it. ``beta = 1`` waits for every block: exactly sync.
* A step is complete (recorded, counted) when every block has applied it. B̂ of a view for
  step s is measured block by block against ``x_s``: a block already at step s contributes 0,
  a late block is compared with its value right after it applies step s - 1.

Departures from the authors' code (docs/consistency.md): the share is by the worker's own
per-block L2 norms as the issue states (``broken_barrier.py`` accumulates a per-layer norm
whose computing line is commented out, and ``broken_barrier_new.py`` uses the layer's
element count); a central coordinator averages instead of an all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from typing_extensions import override

from actors.consistency import elastic_amplification
from actors.messages import GradientReply
from actors.modes.base import (
    Applied,
    Dispatch,
    Member,
    Mode,
    ModeContext,
    Verdict,
    update_constant,
)
from actors.modes.blockviews import BlockViews
from actors.modes.missing import divisor
from actors.scheduling import BlockShareRule, StepBook
from actors.warmup import Constants
from core.spec import ElasticMode, JobSpec, ModeSpec


def elastic_bound_term(beta: float, max_lag: int, update_block_sum: float) -> float:
    """The per-block elastic mode's bound on B (docs/consistency.md: elastic).

    A view for step s lacks, in each late block, the whole update (momentum included) of at
    most ``max_lag`` steps, so ``B <= max_lag * U_S`` always, with ``U_S`` a bound on
    ``sum_b ||d_b||`` of one step's update direction ``d`` (``||.||_2 <= sum_b ||._b||``).
    By the rule the late blocks carry at most ``1 - beta`` of the worker's own gradient
    (per-block L2); when the update has the same block profile (the expectation the bound is
    stated in, checked against mean B̂; see the docs) they carry at most ``1 - beta`` of
    ``U_S``: ``B <= (1 - beta) * max_lag * U_S``, and exactly 0 at ``beta = 1``.

    Args:
        beta: the rule's share in [0, 1].
        max_lag: steps a worker may run ahead.
        update_block_sum: ``U_S``; frozen, or ``(G + wd * ||x||) / (1 - momentum)`` times
            ``sqrt(blocks)`` from a gradient-norm bound ``G``.
    """
    if beta >= 1.0:
        return 0.0
    return (1.0 - beta) * max_lag * update_block_sum


@dataclass
class _StepBlocks:
    """What of one step's gradients arrived, block by block."""

    total: torch.Tensor  # the sum of the arrived blocks (zeros where none yet)
    arrived: list[set[int]]  # per block: the workers whose block arrived
    losses: dict[int, float] = field(default_factory=dict)  # per worker: its batch's loss
    update_sum: float = 0.0  # sum_b ||d_b|| of the blocks applied so far


class ElasticEngine(Mode):
    """Per-block elastic steps (see the module docstring)."""

    name: ClassVar[str] = "elastic"
    streams_blocks: ClassVar[bool] = True

    def __init__(self, ctx: ModeContext) -> None:
        super().__init__(ctx)
        mode = ctx.spec.mode
        assert isinstance(mode, ElasticMode)
        self.rule = BlockShareRule(beta=mode.beta, max_lag=mode.max_lag)
        numel = ctx.model.x.numel()
        self.blocks: list[tuple[int, int]] = list(ctx.blocks or [(0, numel)])
        if self.blocks != ctx.model.opt.blocks:
            raise ValueError("the elastic mode's blocks must be the optimizer's parameters")
        self.book = StepBook(self.total_steps, jumps=True)
        self.done = [0] * len(self.blocks)  # per block: the next step it applies
        self.steps_in: dict[int, _StepBlocks] = {}
        # worker -> (step, per-block norms of its gradient of that step); None: nothing owed
        self.own: dict[int, tuple[int, list[float]] | None] = {}
        self.views = BlockViews(self.blocks, ctx.meter)  # B̂, block by block
        self.block_applies = 0  # names the model of record's state in view keys
        # the sums of completed steps, reused: a step's sum needs no zeroing (a block's
        # first arrival is copied in), and a new one is allocated only past max_lag + 1
        self.free_sums: list[torch.Tensor] = []

    # -- accounting --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.book.completed

    def finished(self) -> bool:
        return self.book.finished()

    def restore(self, step: int) -> None:
        self.book = StepBook(self.total_steps, jumps=True, start_step=step)
        self.done = [step] * len(self.blocks)
        self.steps_in.clear()
        self.views.clear()
        for w in list(self.own):
            self.book.join(w)
            self.own[w] = None

    # -- membership --------------------------------------------------------------------------
    def join(self, worker: int) -> None:
        self.book.join(worker)
        self.own[worker] = None

    def leave(self, worker: int) -> list[int]:
        # blocks it streamed before leaving stay in their steps (they arrived)
        self.own.pop(worker, None)
        return self.book.leave(worker)

    # -- scheduling --------------------------------------------------------------------------
    def applied_share(self, worker: int) -> float | None:
        """Share of the worker's own last gradient (per-block L2) whose blocks' averaged
        update is applied; ``None`` if it owes nothing (fresh, lost, or fully applied)."""
        own = self.own.get(worker)
        if own is None:
            return None
        step, norms = own
        if min(self.done) > step:
            return None
        total = sum(norms)
        if total <= 0.0:
            return 1.0
        got = sum(n for b, n in enumerate(norms) if self.done[b] > step)
        return got / total

    def schedule(self, members: Sequence[Member]) -> list[Dispatch]:
        out: list[Dispatch] = []
        for w in members:
            if w.state not in ("idle", "waiting") or self.book.finished():
                continue
            # a joiner never takes a step some block has already applied without it
            target = max(self.book.next_step(w.id), max(self.done))
            if target >= self.total_steps:
                continue
            d = self.rule.may_start(target, self.book.oldest_incomplete, self.applied_share(w.id))
            if not d.allowed:
                continue
            x = self.model.x
            self.views.handed_out(target, self.done, x, self.step)
            self.book.assign(w.id, target)
            self.own[w.id] = (target, [0.0] * len(self.blocks))
            w.state = "busy"
            out.append(Dispatch(w.id, target, ("e", self.block_applies), x))
        return out

    # -- replies -----------------------------------------------------------------------------
    def _take_block(self, worker: int, step: int, b: int, piece: torch.Tensor, norm: float) -> None:
        sb = self.steps_in.get(step)
        if sb is None:
            total = self.free_sums.pop() if self.free_sums else torch.empty_like(self.model.x)
            sb = _StepBlocks(total, [set() for _ in self.blocks])
            self.steps_in[step] = sb
        if worker in sb.arrived[b] or self.done[b] > step:
            return
        lo, hi = self.blocks[b]
        if sb.arrived[b]:
            sb.total[lo:hi].add_(piece)
        else:  # the block's part of the sum is not initialised before its first arrival
            sb.total[lo:hi].copy_(piece)
        sb.arrived[b].add(worker)
        own = self.own.get(worker)
        if own is not None and own[0] == step:
            own[1][b] = norm

    def _expects(self, worker: int, step: int) -> bool:
        entry = self.book.open.get(step)
        return entry is not None and worker in entry.assigned and worker not in entry.arrived

    def _streamed_and_applied(self, worker: int, step: int) -> bool:
        """The worker's reply for ``step`` whose blocks all streamed in and are applied."""
        own = self.own.get(worker)
        return own is not None and own[0] == step and min(self.done) > step

    @override
    def on_block(
        self, w: Member, step: int, block: int, norm: float, grad: torch.Tensor, loss: float
    ) -> bool:
        if not self._expects(w.id, step) or not 0 <= block < len(self.blocks):
            return False
        lo, hi = self.blocks[block]
        self._take_block(w.id, step, block, grad[lo:hi], norm)
        if math.isfinite(loss):  # the step may complete before the reply: its loss is in
            self.steps_in[step].losses[w.id] = loss
        return True

    def on_reply(self, w: Member, reply: GradientReply, grad: torch.Tensor) -> Verdict:
        step = reply.step
        w.state = "waiting"
        if not self._expects(w.id, step):
            if self._streamed_and_applied(w.id, step):
                # every block came ahead of the reply and the step completed meanwhile (its
                # record has the losses the blocks brought): the reply only closes it
                self.own[w.id] = None
                w.last_step = step
                return Verdict(accepted=True)
            return Verdict(accepted=False, unexpected=True)
        self.book.arrive(w.id, step)
        for b, (lo, hi) in enumerate(self.blocks):
            sb = self.steps_in.get(step)
            if sb is None or w.id not in sb.arrived[b]:  # not streamed: it came with the reply
                piece = grad[lo:hi]
                self._take_block(w.id, step, b, piece, float(piece.norm()))
        self.steps_in[step].losses[w.id] = reply.loss
        w.last_step = step
        return Verdict(accepted=True)

    def on_lost(self, w: Member, reply: GradientReply, grad: torch.Tensor | None) -> bool:
        del grad  # a lost gradient never reaches the update (blocks it streamed did)
        self.book.lose(w.id, reply.step)
        w.state, w.last_step = "waiting", reply.step
        self.own[w.id] = None
        return True

    # -- applying ----------------------------------------------------------------------------
    def _block_ready(self, b: int) -> bool:
        """Block ``b`` can apply its next step: every expected gradient delivered it."""
        step = self.done[b]
        entry = self.book.open.get(step)
        if entry is None or not self.book._closed(step):
            return False
        sb = self.steps_in.get(step)
        got = sb.arrived[b] if sb is not None else set()
        return entry.assigned <= (got | entry.lost)

    def _apply_block(self, b: int) -> None:
        step = self.done[b]
        entry = self.book.open[step]
        sb = self.steps_in.get(step)
        got = sb.arrived[b] if sb is not None else set()
        lost = entry.lost - got
        # zero_fill: the lost share is left out; otherwise the arrived mean stands in (the
        # per-block mode builds no per-worker views: `own` applies as `reaverage` here)
        n = divisor(self.spec.missing_policy, len(got), len(lost))
        lo, hi = self.blocks[b]
        if got and sb is not None:
            opt = self.model.opt
            norm = opt.step_block(b, sb.total[lo:hi], 1.0 / n, step, self.observed(step))
            sb.update_sum += norm or 0.0
        self.done[b] = step + 1
        self.block_applies += 1
        self._measure_block(b, step + 1)

    def _measure_block(self, b: int, now_at: int) -> None:
        self.views.caught_up(b, now_at, self.model.x, self.step, self.model.opt.lr)

    def _apply_whole(self) -> Iterator[Applied]:
        """With clipping: the oldest incomplete step, all blocks at once, once every block
        is ready (see the module docstring)."""
        opt = self.model.opt
        while self.book.completed in self.book.open and all(
            self.done[b] == self.book.completed and self._block_ready(b)
            for b in range(len(self.blocks))
        ):
            step = self.book.completed
            entry = self.book.open[step]
            sb = self.steps_in.get(step)
            if sb is not None and any(sb.arrived):
                for b, (lo, hi) in enumerate(self.blocks):
                    got = sb.arrived[b]
                    if not got:  # a block nobody delivered adds nothing
                        sb.total[lo:hi].zero_()
                        continue
                    n = divisor(self.spec.missing_policy, len(got), len(entry.lost - got))
                    sb.total[lo:hi].mul_(1.0 / n)
                lr = opt.lr
                before = self.model.x.clone() if self.observed(step) else None
                opt.step(sb.total, count=False)
                if before is not None:
                    before.sub_(self.model.x)
                    sb.update_sum = sum(float(before[lo:hi].norm()) / lr for lo, hi in self.blocks)
            self.block_applies += 1
            for b in range(len(self.blocks)):
                self.done[b] = step + 1
                self._measure_block(b, step + 1)
            yield self._complete()

    def apply_ready(self) -> Iterator[Applied]:
        if self.model.opt.spec.clip_grad_norm is not None:
            yield from self._apply_whole()
            return
        progressed = True
        while progressed:
            progressed = False
            for b in range(len(self.blocks)):
                while self._block_ready(b):
                    self._apply_block(b)
                    progressed = True
                    if (
                        self.book.completed in self.book.open
                        and min(self.done) > self.book.completed
                    ):
                        yield self._complete()
            while self.book.completed in self.book.open and min(self.done) > self.book.completed:
                yield self._complete()
                progressed = True

    def _complete(self) -> Applied:
        """Every block applied the oldest incomplete step: it is complete."""
        entry = self.book.complete(self.book.completed)
        sb = self.steps_in.pop(entry.step, None)
        # steps nobody was assigned (the book skips them) are no block's business
        self.done = [max(d, self.book.completed) for d in self.done]
        self.model.version += 1
        # the schedule counts completed steps (the book may skip steps nobody was assigned)
        while self.model.opt.steps < self.book.completed:
            self.model.opt.end_step()
        losses = list(sb.losses.values()) if sb is not None else []
        if sb is not None:
            self.norms.update_block_sum_max = max(self.norms.update_block_sum_max, sb.update_sum)
            if len(self.free_sums) <= self.rule.max_lag:
                self.free_sums.append(sb.total)
        # the model of record is x_step exactly unless some block already applied a later step
        consistent = max(self.done) <= self.book.completed
        return Applied(loss=float(np.mean(losses)) if losses else math.nan, consistent=consistent)

    @override
    def start_notes(self) -> list[str]:
        if self.model.opt.spec.clip_grad_norm is None:
            return []
        return [
            "elastic with optimizer.clip_grad_norm: clipping needs the whole gradient's norm, "
            "so every step is applied whole, once all its blocks are in: workers wait as in "
            "sync, without the per-block overlap (drop the clipping to get it, or use sync)"
        ]

    # -- the bound ---------------------------------------------------------------------------
    @override
    @classmethod
    def bound_term(cls, spec: JobSpec, c: Constants) -> float:
        mode, opt = spec.mode, spec.optimizer
        assert isinstance(mode, ElasticMode)
        # U_S from the frozen constants: max_lag steps' updates, each at most 2M after the
        # optimizer's amplification A (momentum, weight decay); elastic_bound_term takes the
        # per-step share, so the amplification over max_lag steps is divided back out. Adam:
        # 2U with U the frozen bound on one update in update units, A = max_lag (no momentum
        # beyond what U holds)
        m, mu, wd = update_constant(spec, c)
        amp = elastic_amplification(mode.max_lag, mu, wd, opt.lr, opt.nesterov and mu > 0)
        return elastic_bound_term(mode.beta, mode.max_lag, 2.0 * m * amp / mode.max_lag)

    @override
    def tighten(self) -> ModeSpec | None:
        """A larger share to wait for (β + 0.25, up to 1 = sync), then a smaller lag."""
        mode = self.spec.mode
        assert isinstance(mode, ElasticMode)
        if mode.beta < 1.0:
            return mode.model_copy(update={"beta": min(1.0, mode.beta + 0.25)})
        if mode.max_lag > 1:
            return mode.model_copy(update={"max_lag": mode.max_lag // 2})
        return None

    @override
    def retune(self, setting: ModeSpec) -> int:
        assert isinstance(setting, ElasticMode)
        super().retune(setting)
        self.rule = BlockShareRule(beta=setting.beta, max_lag=setting.max_lag)
        return 0
