"""The interface every consistency mode implements, and what the coordinator hands it.

A mode is the part of the coordinator that decides *when* a worker may compute, *on which
view*, and *what happens to what comes back*. It owns the model of record's updates (it
applies them to :class:`ModelOfRecord` through the job's optimizer) and its own
bookkeeping (steps, rounds or versions). It does not talk to workers, Ray or the clock:
the loop (:mod:`actors.coordinator.loop`) asks it and acts on its answers.

One turn of the loop, as the mode sees it:

* :meth:`Mode.schedule`: which waiting workers start now, on which view (a list of
  :class:`Dispatch`; the worker computes :meth:`Mode.local_steps` steps on it);
* :meth:`Mode.on_reply` / :meth:`Mode.on_lost`: a gradient arrived / was lost on the way
  (or refused as non-finite);
* :meth:`Mode.leave`: a worker left (crashed, retired);
* :meth:`Mode.apply_ready`: apply every update that became applicable, yielding one
  :class:`Applied` per update *after* it is applied (the loop records, evaluates and
  checkpoints between updates, so each sees the model of its own step);
* :meth:`Mode.finished`, :attr:`Mode.step`, :meth:`Mode.restore`: the mode's accounting;
* :meth:`Mode.bound_term`: the mode's term of the bound on B, from the frozen constants
  (docs/consistency.md);
* :meth:`Mode.tighten` / :meth:`Mode.retune`: the guard's stricter setting, proposed, then
  applied live (:mod:`actors.guard`).

Modes are registered by the spec's mode name in :mod:`actors.modes.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from actors.consistency import Meter, ObservedNorms
from actors.messages import GradientReply
from actors.optim import RecordOptimizer
from actors.warmup import Constants
from core.spec import JobSpec, ModeSpec

# A view's identity: identical keys are the same vector (the data plane shares one copy).
# ("x", version) is the model of record itself; other keys name provisional views.
ViewKey = tuple[Any, ...]


class Member(Protocol):
    """What a mode sees of a worker (the coordinator's slot has more)."""

    id: int
    # idle | busy | waiting | held (| starting | dead | left, never handed to a mode)
    state: str
    last_step: int | None


class ModelOfRecord:
    """The consistent model ``x``, its optimizer, and the count of updates applied.

    ``x`` is the optimizer's: its parameters are views of it (:mod:`actors.optim`), so
    assigning a new tensor (shared memory) rebinds the optimizer to it.

    Args:
        opt: the job's optimizer over the flat model of record.
        version: updates applied so far.
    """

    def __init__(self, opt: RecordOptimizer, version: int = 0) -> None:
        self.opt = opt
        self.version = version

    @property
    def x(self) -> torch.Tensor:
        return self.opt.x

    @x.setter
    def x(self, value: torch.Tensor) -> None:
        if value is not self.opt.x:
            self.opt.rebind(value)


def update_constant(spec: JobSpec, c: Constants) -> tuple[float, float, float]:
    """``(M, momentum, weight_decay)`` a mode's bound term is written in.

    SGD: the frozen gradient-norm bound ``M``, amplified by momentum and weight decay. Adam
    and AdamW: the frozen bound ``U`` on one step's update direction in update units
    (``||x_k - x_{k+1}|| / lr_k``, moments and weight decay inside it), not amplified
    further (docs/consistency.md: adaptive optimizers).
    """
    opt = spec.applied_optimizer()
    if opt.adaptive:
        return c.u, 0.0, 0.0
    return c.m, opt.momentum, opt.weight_decay


@dataclass
class ModeContext:
    """What a mode is built with.

    Args:
        spec: the job.
        total_steps: steps the job runs (records count these).
        model: the model of record the mode updates.
        meter: where B̂ samples go.
        norms: observed norms (the bound's constants); the mode adds update norms.
        blocks: the parameter blocks ``[lo, hi)`` of ``x`` (one per parameter tensor), for
            modes that apply per block; ``None``: ``x`` is one block.
    """

    spec: JobSpec
    total_steps: int
    model: ModelOfRecord
    meter: Meter
    norms: ObservedNorms
    blocks: list[tuple[int, int]] | None = None


@dataclass
class Dispatch:
    """Start ``worker`` on ``step`` with view ``view`` (identified by ``key``)."""

    worker: int
    step: int
    key: ViewKey
    view: torch.Tensor


@dataclass
class Applied:
    """One update applied to the model of record.

    Attributes:
        loss: the step's mean training loss (``nan``: no gradient arrived).
        record: whether this update ends a step (async: one step is ``workers`` updates).
        apply_s: seconds the optimizer step took (``None``: not timed, or nothing applied).
        lost_step: the step, if every gradient it expected was lost on the way (the
            step's record has no loss; docs/consistency.md, "Missing gradients").
        consistent: the model of record is exactly the model of this step (per-block modes:
            false while some block has already applied a later step; no checkpoint then).
    """

    loss: float
    record: bool = True
    apply_s: float | None = None
    lost_step: int | None = None
    consistent: bool = True


@dataclass
class Verdict:
    """What became of a reply.

    Attributes:
        accepted: the gradient counts (it is, or will be, applied).
        refused_stale: refused as too stale (async); counted as ``refused``.
        unexpected: nobody asked for it (a step the worker no longer holds).
    """

    accepted: bool
    refused_stale: bool = False
    unexpected: bool = False


class Mode(ABC):
    """A consistency mode (see the module docstring).

    Args:
        ctx: the model of record, the meter and the job.
    """

    #: the spec's mode name this class runs (the registry's key)
    name: ClassVar[str]
    #: views of ``x`` may be the model of record's own memory (shared in place): true when
    #: ``x`` only changes while no worker computes on it, and gradients may stay in the
    #: workers' slots until their step is applied (no worker overwrites its slot before)
    shares_model_slot: ClassVar[bool] = False
    #: workers stream their gradient block by block (:meth:`on_block`) where they can
    streams_blocks: ClassVar[bool] = False

    def __init__(self, ctx: ModeContext) -> None:
        self.ctx = ctx
        self.spec = ctx.spec
        self.model = ctx.model
        self.meter = ctx.meter
        self.norms = ctx.norms
        self.total_steps = ctx.total_steps

    def observed(self, step: int) -> bool:
        """Step ``step``'s update norms are measured for the summary's observed norms (every
        ``monitor_interval``-th step, as B̂: the measurement copies the model)."""
        return step % self.spec.monitor_interval == 0

    # -- what a worker computes ------------------------------------------------------------
    def local_steps(self) -> int:
        """Optimizer steps a worker takes per request (1: one gradient on the view)."""
        return 1

    # -- accounting --------------------------------------------------------------------------
    @property
    @abstractmethod
    def step(self) -> int:
        """Steps completed (what records and ``total_steps`` count)."""

    @abstractmethod
    def finished(self) -> bool:
        """True once the job's last step is applied."""

    @abstractmethod
    def restore(self, step: int) -> None:
        """Continue from a checkpoint taken at ``step`` (``model.version`` is restored)."""

    # -- membership --------------------------------------------------------------------------
    @abstractmethod
    def join(self, worker: int) -> None:
        """A worker joined (or re-joined) and may be scheduled."""

    @abstractmethod
    def leave(self, worker: int) -> list[int]:
        """A worker left; returns the steps it left without a gradient."""

    # -- scheduling and replies --------------------------------------------------------------
    @abstractmethod
    def schedule(self, members: Sequence[Member]) -> list[Dispatch]:
        """Which of ``members`` (live, by id) start now; marks those ``busy``."""

    @abstractmethod
    def on_reply(self, w: Member, reply: GradientReply, grad: torch.Tensor) -> Verdict:
        """A reply arrived (through the fault plan's network path); ``grad`` is decoded."""

    def on_block(
        self, w: Member, step: int, block: int, norm: float, grad: torch.Tensor, loss: float
    ) -> bool:
        """One parameter block of ``w``'s step-``step`` gradient is in ``grad`` (its slot),
        ahead of the reply, with the batch's ``loss`` (only called when
        :attr:`streams_blocks`); True if taken."""
        del w, step, block, norm, grad, loss
        return False

    @abstractmethod
    def on_lost(self, w: Member, reply: GradientReply, grad: torch.Tensor | None) -> bool:
        """A reply's gradient is not applied; True if a step now misses a gradient.

        Args:
            grad: the gradient lost on the way (dropped): kept for the B̂ monitor, since it is
                part of the consistent model; ``None`` for one refused as non-finite, which
                is not.
        """

    @abstractmethod
    def apply_ready(self) -> Iterator[Applied]:
        """Apply every update that became applicable, one :class:`Applied` after each."""

    # -- the bound ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def bound_term(cls, spec: JobSpec, c: Constants) -> float:
        """The mode's own term of the bound on B, from the frozen constants ``c`` and the
        settings in ``spec`` (docs/consistency.md)."""

    def start_notes(self) -> list[str]:
        """What a user should know about this job's settings before it trains (each a
        ``warning`` event at the start): a combination the mode runs, but not as asked."""
        return []

    # -- the guard's stricter setting ----------------------------------------------------------
    def tighten(self) -> ModeSpec | None:
        """A stricter setting of this mode (smaller B), or ``None``: there is none.

        Pure: it proposes; :meth:`retune` applies. The default: nothing stricter.
        """
        return None

    def retune(self, setting: ModeSpec) -> int:
        """Switch to ``setting`` (one :meth:`tighten` proposed) while the job runs.

        Returns:
            Gradients refused because the new setting no longer admits them.
        """
        self.spec.mode = setting
        return 0
