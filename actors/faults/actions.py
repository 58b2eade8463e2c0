"""What the fault kinds decide, as typed values: policies decide, the actors act.

Three kinds of answer, one per hook of :class:`~actors.faults.base.FaultType`:

* on a coordinator tick, a list of :data:`TickAction` (kill a worker, kill the coordinator,
  cut a worker off or let it back, record that a straggler delay or a corruption is on);
  the coordinator carries each out for real and records the event;
* on a reply arriving at the coordinator, a :class:`ReplyVerdict` (deliver, drop, hold);
* on a worker's gradient, a :class:`GradientEffect` (stall for so long, corrupt it so),
  which the worker applies to its own gradient before it sends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Literal

import torch

CorruptionName = Literal["nan", "inf", "scale"]


# -- on tick (coordinator) -------------------------------------------------------------------


@dataclass(frozen=True)
class KillCoordinator:
    """SIGKILL the coordinator's own process (Ray restarts it from the last checkpoint)."""

    # nothing after this action runs: the process is gone
    final: ClassVar[bool] = True
    step: int  # the step the coordinator was at when the fault fired


@dataclass(frozen=True)
class KillWorker:
    """SIGKILL the worker's process; start it again after ``rejoin_after_s`` if given."""

    final: ClassVar[bool] = False
    worker: int
    rejoin_after_s: float | None = None


@dataclass(frozen=True)
class PartitionStart:
    """Cut the worker off: its replies are held until the window ends."""

    final: ClassVar[bool] = False
    worker: int


@dataclass(frozen=True)
class PartitionHeal:
    """The worker's partition window ended: deliver what was held, or bring it back."""

    final: ClassVar[bool] = False
    worker: int


@dataclass(frozen=True)
class DelayOn:
    """A straggler delay window opened on the worker (the worker stalls itself)."""

    final: ClassVar[bool] = False
    worker: int
    distribution: str
    delay_ms: float


@dataclass(frozen=True)
class CorruptOn:
    """A corruption window opened on the worker (the worker corrupts its own gradients)."""

    final: ClassVar[bool] = False
    worker: int
    corruption: CorruptionName
    scale_factor: float | None = None
    # per-gradient probability inside the window (None: every gradient)
    probability: float | None = None


TickAction = KillCoordinator | KillWorker | PartitionStart | PartitionHeal | DelayOn | CorruptOn


# -- on reply (coordinator's receive path) ---------------------------------------------------


class ReplyVerdict(StrEnum):
    """What the network path does with one reply."""

    DELIVER = "deliver"  # the reply reaches the coordinator
    DROP = "drop"  # the gradient message is lost (the reply's step sees a gap)
    HOLD = "hold"  # the worker is cut off: the reply waits until its partition heals


# -- on gradient (worker) --------------------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    """One corruption of a gradient.

    ``nan`` and ``inf`` make every entry non-finite (any compressor then sends a
    non-finite payload too); ``scale`` multiplies the gradient by ``scale_factor``, which
    keeps it finite: the coordinator applies it (a later consistency guard is what catches
    a scaled gradient, not the finite-value check).
    """

    name: CorruptionName
    scale_factor: float = 1.0

    def apply(self, grad: torch.Tensor) -> None:
        """Corrupt ``grad`` in place."""
        if self.name == "nan":
            grad.fill_(float("nan"))
        elif self.name == "inf":
            grad.fill_(float("inf"))
        else:
            grad.mul_(self.scale_factor)


@dataclass(frozen=True)
class GradientEffect:
    """What the plan does to one gradient of one worker."""

    delay_s: float = 0.0  # stall this long before replying
    corruptions: tuple[Corruption, ...] = ()  # applied in order, before compression

    @property
    def corrupted(self) -> bool:
        return bool(self.corruptions)

    def then(self, other: GradientEffect) -> GradientEffect:
        """Both effects: delays add up, corruptions apply one after the other."""
        return GradientEffect(self.delay_s + other.delay_s, self.corruptions + other.corruptions)


NO_EFFECT = GradientEffect()
