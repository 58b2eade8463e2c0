"""``async(tau)``: workers never wait; each gradient is an update of its own.

A worker starts at once on the current model of record. Its gradient, computed on a view
``s`` updates old, is applied on arrival, unless ``s > tau``: then it is refused (counted),
or, with ``on_stale=wait``, fresher gradients are held back so that no outstanding one can
become stale (:class:`actors.scheduling.AsyncRule`). One *step* is ``workers`` applied
updates (the samples of one synchronous step), so ``total_steps`` and records mean the same
as in the step modes. (The module is not called ``async``: that is a Python keyword.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from typing_extensions import override

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
from actors.scheduling import AsyncRule, make_async_rule
from actors.warmup import Constants
from core.spec import AsyncMode, JobSpec, ModeSpec


class AsyncEngine(Mode):
    """Bounded-staleness asynchronous updates (see the module docstring)."""

    name: ClassVar[str] = "async"

    def __init__(self, ctx: ModeContext) -> None:
        super().__init__(ctx)
        mode = ctx.spec.mode
        assert isinstance(mode, AsyncMode)
        self.rule: AsyncRule = make_async_rule(mode)
        # one step is one update per initial worker (the samples of a synchronous step)
        self.p0 = ctx.spec.workers
        self.total_updates = self.total_steps * self.p0
        self.outstanding: dict[int, int] = {}  # busy or held worker -> its view's version
        self.view_vec: dict[int, torch.Tensor] = {}  # sampled views, kept until applied
        self.held: dict[int, tuple[Member, GradientReply, torch.Tensor]] = {}
        self.staleness_max = 0  # the oldest view an applied gradient was computed on

    @property
    @override
    def step(self) -> int:
        return self.model.version // self.p0

    @override
    def finished(self) -> bool:
        return self.model.version >= self.total_updates

    @override
    def restore(self, step: int) -> None:
        """Nothing beyond ``model.version``: async keeps no per-step book."""

    @override
    def join(self, worker: int) -> None:
        """A new worker is idle; it starts on the next schedule."""

    @override
    def leave(self, worker: int) -> list[int]:
        self._forget(worker)
        return []

    def _forget(self, worker: int) -> None:
        self.outstanding.pop(worker, None)
        self.view_vec.pop(worker, None)
        self.held.pop(worker, None)

    @override
    def schedule(self, members: Sequence[Member]) -> list[Dispatch]:
        out: list[Dispatch] = []
        version = self.model.version
        for w in members:
            if w.state != "idle":
                continue
            flying = list(self.outstanding.values())
            if version + len(flying) >= self.total_updates:
                break
            if not self.rule.may_dispatch(version, flying).allowed:
                break
            self.outstanding[w.id] = version
            if self.meter.sample_view():
                self.view_vec[w.id] = self.model.x.clone()
            w.state = "busy"
            out.append(Dispatch(w.id, self.step, ("x", version), self.model.x))
        return out

    @override
    def on_reply(self, w: Member, reply: GradientReply, grad: torch.Tensor) -> Verdict:
        view = self.outstanding.get(w.id, self.model.version)
        if self.rule.verdict(self.model.version, view) == "refuse":
            self._forget(w.id)
            w.state = "idle"
            return Verdict(accepted=False, refused_stale=True)
        self.held[w.id] = (w, reply, grad)
        w.state = "held"
        return Verdict(accepted=True)

    @override
    def on_lost(self, w: Member, reply: GradientReply, grad: torch.Tensor | None) -> bool:
        self._forget(w.id)
        w.state = "idle"
        return False

    @override
    def apply_ready(self) -> Iterator[Applied]:
        progress = True
        while progress:
            progress = False
            for wid in sorted(self.held, key=lambda k: self.outstanding[k]):
                others = [v for o, v in self.outstanding.items() if o != wid]
                if not self.rule.may_apply(
                    self.model.version, self.outstanding[wid], others
                ).allowed:
                    continue
                yield self._apply(wid)
                progress = True

    def _apply(self, wid: int) -> Applied:
        w, reply, grad = self.held.pop(wid)
        x, opt = self.model.x, self.model.opt
        v = self.view_vec.pop(wid, None)
        if v is not None:
            self.meter.measure(self.step, (x - v) / opt.lr)
        if self.observed(self.model.version):
            self.norms.see_update(opt.step_measured(grad))
        else:
            opt.step(grad)
        self.staleness_max = max(self.staleness_max, self.model.version - self.outstanding[wid])
        self.model.version += 1
        self.outstanding.pop(wid, None)
        w.state = "idle"
        return Applied(loss=reply.loss, record=self.model.version % self.p0 == 0)

    @override
    def start_notes(self) -> list[str]:
        mode, opt = self.spec.mode, self.spec.optimizer
        assert isinstance(mode, AsyncMode)
        if mode.momentum_scaling != "match_sync":
            return []
        applied = self.model.opt.spec.momentum
        return [
            f"async with momentum_scaling match_sync: optimizer.momentum {opt.momentum:g} is "
            f"applied as {applied:.4g} per gradient over {self.p0} workers (1 - mu_a = p (1 - "
            "mu): each gradient's long-run share of the model is that of a sync step's mean)"
        ]

    @override
    @classmethod
    def bound_term(cls, spec: JobSpec, c: Constants) -> float:
        mode = spec.mode
        assert isinstance(mode, AsyncMode)
        m, mu, _ = update_constant(spec, c)
        # a view at most tau updates old; each update (a momentum buffer, or g + mu buf with
        # Nesterov) has norm <= M / (1 - mu), mu the momentum applied (momentum_scaling);
        # Adam: <= U, in update units (docs: async)
        return mode.max_staleness * m / (1.0 - mu)

    @override
    def tighten(self) -> ModeSpec | None:
        """Half the staleness the run has used, down to 0 (then nothing stricter).

        Halving ``tau`` itself would take many steps to matter when ``tau`` is far above
        the staleness that occurs (with p workers about p - 1): ``min(tau, staleness seen)``
        is halved instead.
        """
        mode = self.spec.mode
        assert isinstance(mode, AsyncMode)
        if mode.max_staleness == 0:
            return None
        return mode.model_copy(
            update={"max_staleness": min(mode.max_staleness, self.staleness_max) // 2}
        )

    @override
    def retune(self, setting: ModeSpec) -> int:
        """Use the new ``tau`` at once; held gradients it no longer admits are refused
        (``wait`` mode would otherwise hold them for ever)."""
        assert isinstance(setting, AsyncMode)
        super().retune(setting)
        self.rule = make_async_rule(setting)
        self.staleness_max = 0
        late = [
            wid
            for wid in self.held
            if self.rule.verdict(self.model.version, self.outstanding[wid]) == "refuse"
        ]
        for wid in late:
            w = self.held[wid][0]
            self._forget(wid)
            w.state = "idle"
        return len(late)
