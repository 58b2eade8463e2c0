"""Typed records and events of a run: what crosses from the coordinator to the service.

A run produces two streams, both numbered by one ``seq`` per job (so a poller that restarts
can acknowledge what it has and lose nothing):

* records: a :class:`StepRecord` per applied step and an :class:`EvalRecord` per evaluation;
* events: an :class:`Event` per thing that happened (a state change, a fault firing, a loss
  detected, a checkpoint). An event's ``kind`` is an :class:`EventKind`; a fault's kind and
  target are fields (``fault``, ``target``), so an analysis never reads ``detail``, which is
  for people and may be reworded freely.

All three are plain dataclasses: they pickle across Ray actors, and ``to_dict`` /
``from_dict`` give the JSON form kept in the journal, ``metrics.jsonl`` and the store.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any


class EventKind(StrEnum):
    """What an event is about."""

    STATE = "state"  # the run's state changed (``detail``: "old -> new: why")
    MEMBERSHIP = "membership"  # a worker joined, re-attached, left or failed to start
    FAULT = "fault"  # an injected fault fired (``fault`` names its kind)
    INJECT = "inject"  # a fault was added to the running plan (through the API)
    HEAL = "heal"  # an injected fault's window ended (a partition healed)
    DETECT = "detect"  # a worker was found lost (dead process, silence, partition)
    MISSING = "missing"  # a step's gradient is missing (dropped); the missing policy decides
    REFUSED = "refused"  # a gradient was refused (non-finite, or an unexpected step)
    CHECKPOINT = "checkpoint"  # a checkpoint was written (or an invalid one skipped)
    RESTART = "restart"  # the coordinator restarted (from a checkpoint, or from step 0)
    BOUND = "bound"  # the warm-up ended: the frozen constants and the stated bound
    GUARD = "guard"  # the guard judged the run out of bound or diverged (``guard``: action)
    # written by the service, not the coordinator
    QUEUED = "queued"  # the job pends: the reason it cannot start yet
    CANCEL = "cancel"  # a cancel was requested
    RESUME = "resume"  # the service resumes the job from a checkpoint
    REAP = "reap"  # an actor that belonged to no live job was killed
    RAY = "ray"  # Ray's GCS stopped answering; the job waits for a new connection
    WARNING = "warning"  # something the user should know that changes nothing


class FaultKind(StrEnum):
    """The injectable faults (one class each in :mod:`actors.faults`)."""

    CRASH = "crash"  # the worker's process is killed (SIGKILL), optionally rejoins
    DROP = "drop"  # a gradient message is lost on its way to the coordinator
    DELAY = "delay"  # the worker stalls before replying (straggler)
    PARTITION = "partition"  # the worker cannot reach the coordinator for a window
    COORDINATOR_CRASH = "coordinator_crash"  # the coordinator's process is killed
    CORRUPT = "corrupt"  # the worker's gradient becomes non-finite or scaled
    EXTERNAL = "external"  # not injected by the plan: killed from outside (a test, an operator)


def worker_target(worker: int) -> str:
    """The ``target`` of an event about worker ``worker``."""
    return f"worker-{worker}"


COORDINATOR_TARGET = "coordinator"


@dataclass(frozen=True)
class Event:
    """One thing that happened in a run.

    Args:
        seq: position in the job's record/event sequence (unique per job).
        wall_time: Unix time when it happened.
        time_s: seconds since the job's start.
        step: the step the run was at.
        kind: what the event is about.
        detail: a human-readable sentence (never parsed).
        target: ``worker-<id>``, ``coordinator``, a comma-separated list, or ``None``.
        fault: the fault kind this event is about (a firing, a heal, a detection it caused).
        guard: for a ``guard`` event, the action taken (``warn``, ``tighten``, ``fail``,
            ``rollback``); for a ``bound`` event, ``stated`` or ``restated``.
    """

    seq: int
    wall_time: float
    time_s: float
    step: int
    kind: EventKind
    detail: str
    target: str | None = None
    fault: FaultKind | None = None
    guard: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["fault"] = None if self.fault is None else self.fault.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        fault = d.get("fault")
        return cls(
            seq=int(d["seq"]),
            wall_time=float(d["wall_time"]),
            time_s=float(d.get("time_s") or 0.0),
            step=int(d.get("step") or 0),
            kind=EventKind(d["kind"]),
            detail=str(d.get("detail", "")),
            target=None if d.get("target") is None else str(d["target"]),
            fault=None if fault is None else FaultKind(fault),
            guard=None if d.get("guard") is None else str(d["guard"]),
        )

    @property
    def worker(self) -> int | None:
        """The worker id of a single-worker target (``None`` otherwise)."""
        if self.target is None or not self.target.startswith("worker-"):
            return None
        rest = self.target.removeprefix("worker-")
        return int(rest) if rest.isdigit() else None


def _num(v: float | None) -> float | None:
    """JSON has no NaN: a missing or NaN value is ``None``."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


@dataclass(frozen=True)
class StepRecord:
    """One applied step (in async mode: one per ``p0`` applied updates)."""

    seq: int
    step: int
    time_s: float
    wall_time: float
    loss: float | None
    samples_per_s: float
    samples: int
    b_hat: float
    b_hat_max: float
    bound: float | None
    workers: int
    refused: int = 0
    kind: str = field(default="step", init=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss"] = _num(self.loss)
        return d


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation of the model of record on the held-out data."""

    seq: int
    step: int
    time_s: float
    wall_time: float
    workers: int
    metrics: dict[str, float | None] = field(default_factory=dict)
    kind: str = field(default="eval", init=False)

    def to_dict(self) -> dict[str, Any]:
        """The metrics flattened beside the other fields (``test_accuracy``, ...)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metrics"}
        d.update({k: _num(v) for k, v in self.metrics.items()})
        return d

    def get(self, name: str) -> float | None:
        return self.metrics.get(name)


Record = StepRecord | EvalRecord


def record_from_dict(d: dict[str, Any]) -> Record:
    """The typed record of a ``to_dict`` form (journal, ``metrics.jsonl``, the store)."""
    if d.get("kind") == "eval":
        base = {"seq", "step", "time_s", "wall_time", "workers", "kind"}
        return EvalRecord(
            seq=int(d["seq"]),
            step=int(d["step"]),
            time_s=float(d["time_s"]),
            wall_time=float(d["wall_time"]),
            workers=int(d.get("workers") or 0),
            metrics={k: (None if v is None else float(v)) for k, v in d.items() if k not in base},
        )
    names = {f.name for f in fields(StepRecord) if f.init}
    return StepRecord(**{k: v for k, v in d.items() if k in names})
