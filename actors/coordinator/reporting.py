"""What the coordinator tells the world: records, events, timing, status and the summary.

Metrics and events wait in a buffer until a poll acknowledges them (:meth:`Reporter.poll`),
so a restarted poller loses nothing; every one also goes to the journal (when the job has a
state folder), from which a restarted coordinator replays them. The summary is built from
:class:`RunFacts`, the numbers the loop hands over when asked.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.checkpoint import Journal
from actors.messages import GradientReply
from actors.transport import host_id
from core.events import EvalRecord, Event, EventKind, FaultKind, Record, StepRecord
from core.spec import JobSpec

log = logging.getLogger("elastic_sgd.coordinator")

# samples/s is measured over the last 50 step records: long enough to smooth one slow
# step, short enough to follow a resize within a few seconds
RATE_WINDOW = 50


@dataclass
class Timing:
    """Where a step's time goes: worker compute, injected delay, the rest of the round trip."""

    n: int = 0
    compute_s: float = 0.0
    delay_s: float = 0.0
    roundtrip_s: float = 0.0
    apply_s: float = 0.0
    applies: int = 0
    apply_threads: int = 1  # the most torch threads an update ran on (Training.apply_threads)

    def see(self, reply: GradientReply, roundtrip_s: float) -> None:
        self.n += 1
        self.compute_s += reply.compute_s
        self.delay_s += reply.delay_s
        self.roundtrip_s += roundtrip_s

    def see_apply(self, apply_s: float | None) -> None:
        if apply_s is not None:
            self.apply_s += apply_s
            self.applies += 1

    @property
    def mean_roundtrip_s(self) -> float:
        return self.roundtrip_s / max(self.n, 1)

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {
            "compute_ms": 1e3 * self.compute_s / n,
            "delay_ms": 1e3 * self.delay_s / n,
            "roundtrip_ms": 1e3 * self.roundtrip_s / n,
            "overhead_ms": 1e3 * (self.roundtrip_s - self.compute_s - self.delay_s) / n,
            "apply_ms": 1e3 * self.apply_s / max(self.applies, 1),
            "apply_threads": self.apply_threads,
        }


@dataclass
class Recovery:
    """One worker's loss and what followed (wall times; ``None``: not yet)."""

    kind: str  # "crash" (injected) | "lost" (killed from outside, node lost, hung)
    worker: int
    t_fault: float
    t_detected: float | None = None
    t_next_update: float | None = None
    t_rejoined: float | None = None

    def summary(self) -> dict[str, Any]:
        item: dict[str, Any] = {"kind": self.kind, "worker": self.worker}
        for key, t in (
            ("detected", self.t_detected),
            ("next_update", self.t_next_update),
            ("rejoined", self.t_rejoined),
        ):
            if t is not None:
                item[f"{key}_after_s"] = t - self.t_fault
        return item


@dataclass
class RunFacts:
    """The loop's numbers the summary is made of."""

    job_id: str
    spec: JobSpec
    state: str
    error: str | None
    steps: int
    total_steps: int
    updates: int
    samples: int
    workers_final: int
    refused: int
    dropped: int
    corrupted: int  # replies the injector marked corrupted
    refused_nonfinite: int  # gradients refused for a NaN or an infinite entry
    steps_all_lost: int
    restarts: int
    steps_lost: int
    parameters: int
    consistency: dict[str, Any]
    t_start: float
    t_end: float | None


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


class Reporter:
    """Records, events and recovery timings of one coordinator incarnation.

    Args:
        t0: the job's start (wall time); ``time_s`` of records and events counts from it.
        journal: where every record and event is appended (``None``: no state folder).
        step_of: the current step (events carry it unless told otherwise).
    """

    def __init__(self, t0: float, journal: Journal | None, step_of: Callable[[], int]) -> None:
        self.t0 = t0
        self.journal = journal
        self.step_of = step_of
        self.seq = 0
        self.records: list[Record] = []  # not yet acknowledged by a poll
        self.events: list[Event] = []  # not yet acknowledged by a poll
        self.event_log: list[Event] = []  # every event of the run
        self.rate_window: list[tuple[float, int]] = []
        self.last_eval: dict[str, float] = {}
        self.timing = Timing()
        self.recoveries: list[Recovery] = []

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def event(
        self,
        kind: EventKind,
        detail: str,
        target: str | None = None,
        step: int | None = None,
        fault: FaultKind | None = None,
        guard: str | None = None,
    ) -> None:
        now = time.time()
        ev = Event(
            seq=self.next_seq(),
            wall_time=now,
            time_s=now - self.t0,
            step=self.step_of() if step is None else step,
            kind=kind,
            detail=detail,
            target=target,
            fault=fault,
            guard=guard,
        )
        self.events.append(ev)
        self.event_log.append(ev)
        if self.journal is not None:
            self.journal.append(ev.to_dict())
        log.info("%s %s %s", kind, target or "", detail)

    def all_lost(self, step: int, policy: str, so_far: int) -> None:
        """Step ``step`` lost every gradient (missing gradients): say so."""
        self.event(
            EventKind.MISSING,
            f"step {step}: every gradient lost; a zero gradient is applied (momentum goes "
            f"on), policy {policy} ({so_far} such steps so far)",
            step=step,
        )

    def replay(self, ev_or_rec: Event | Record) -> None:
        """An event or record of an earlier incarnation (from the journal)."""
        self.seq = max(self.seq, ev_or_rec.seq)
        if isinstance(ev_or_rec, Event):
            self.events.append(ev_or_rec)
            self.event_log.append(ev_or_rec)
        else:
            self.records.append(ev_or_rec)

    def add_record(self, rec: Record) -> None:
        self.records.append(rec)
        if self.journal is not None:
            self.journal.append(rec.to_dict())

    def step_record(
        self,
        *,
        loss: float,
        samples: int,
        b_hat: float,
        b_hat_max: float,
        bound: float | None,
        workers: int,
        refused: int,
    ) -> None:
        """One step's record (``loss`` nan: no gradient arrived)."""
        now = time.time()
        self.rate_window.append((now, samples))
        self.rate_window = self.rate_window[-RATE_WINDOW:]
        t_a, s_a = self.rate_window[0]
        rate = (samples - s_a) / (now - t_a) if now > t_a else 0.0
        self.add_record(
            StepRecord(
                seq=self.next_seq(),
                step=self.step_of(),
                time_s=now - self.t0,
                wall_time=now,
                loss=None if math.isnan(loss) else loss,
                samples_per_s=rate,
                samples=samples,
                b_hat=b_hat,
                b_hat_max=b_hat_max,
                bound=bound,
                workers=workers,
                refused=refused,
            )
        )

    def eval_record(self, metrics: dict[str, float], workers: int) -> None:
        self.last_eval = metrics
        now = time.time()
        values: dict[str, float | None] = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
        }
        self.add_record(
            EvalRecord(
                seq=self.next_seq(),
                step=self.step_of(),
                time_s=now - self.t0,
                wall_time=now,
                workers=workers,
                metrics=values,
            )
        )

    def poll(self, ack_seq: int) -> tuple[list[Record], list[Event]]:
        """New records and events since ``ack_seq`` (older ones are dropped as delivered)."""
        self.records = [r for r in self.records if r.seq > ack_seq]
        self.events = [e for e in self.events if e.seq > ack_seq]
        return list(self.records), list(self.events)

    def flush(self) -> None:
        if self.journal is not None:
            self.journal.flush()

    # -- recoveries ----------------------------------------------------------------------
    def worker_lost(self, worker: int, now: float) -> None:
        """A worker's loss was detected (a planned crash, or one from outside)."""
        if not any(r.worker == worker and r.t_detected is None for r in self.recoveries):
            # not a planned crash (killed from outside, node lost, hung): time from detection
            self.recoveries.append(Recovery("lost", worker, now))
        for r in self.recoveries:
            if r.worker == worker and r.t_detected is None:
                r.t_detected = now

    def worker_rejoined(self, worker: int, now: float) -> None:
        for r in self.recoveries:
            if r.worker == worker and r.t_rejoined is None:
                r.t_rejoined = now

    def note_update(self) -> None:
        """Recovery timing: the first update applied after a lost worker was detected."""
        now = time.time()
        for r in self.recoveries:
            if r.t_detected is not None and r.t_next_update is None:
                r.t_next_update = now

    def recovery_summary(self) -> list[dict[str, Any]]:
        return [r.summary() for r in self.recoveries]

    # -- the summary ---------------------------------------------------------------------
    def summary(self, f: RunFacts) -> dict[str, Any]:
        end = f.t_end or time.time()
        wall = max(end - f.t_start, 1e-9)  # 1 ns: a run that never started still divides
        recoveries = self.recovery_summary()
        return {
            "job_id": f.job_id,
            "name": f.spec.name,
            "state": f.state,
            "error": f.error,
            "final_test_accuracy": self.last_eval.get("test_accuracy"),
            "final_test_loss": self.last_eval.get("test_loss"),
            "final_test_mse": self.last_eval.get("test_mse"),
            "final_dist_to_optimum": self.last_eval.get("dist_to_optimum"),
            # every value of the last evaluation (a task's own test_<metric> too)
            "final_eval": dict(self.last_eval),
            "steps": f.steps,
            "total_steps": f.total_steps,
            "updates": f.updates,
            "wall_seconds": wall,
            "samples": f.samples,
            "samples_per_s": f.samples / wall,
            "mode": f.spec.mode.name,
            "mode_settings": f.spec.mode.model_dump(),
            "workers": f.spec.workers,
            "workers_final": f.workers_final,
            "refused_stale": f.refused,
            "dropped_gradients": f.dropped,
            # replies the injector marked corrupted, among those that passed the network
            # path (a dropped or never-delivered one is neither counted nor checked)
            "gradients_corrupted": f.corrupted,
            # gradients refused for a NaN or an infinite entry (never applied)
            "gradients_refused_nonfinite": f.refused_nonfinite,
            # steps whose every gradient was lost (docs/consistency.md, "Missing gradients")
            "steps_all_lost": f.steps_all_lost,
            "restarts": f.restarts,
            "steps_lost": f.steps_lost,
            "recoveries": recoveries,
            # seconds from each worker's death to the next applied update
            "recovery_s": [
                r["next_update_after_s"] for r in recoveries if "next_update_after_s" in r
            ],
            "parameters": f.parameters,
            "consistency": f.consistency,
            "timing": self.timing.summary(),
            "events": [e.to_dict() for e in self.event_log],
            "versions": versions(),
            "host": host_id(),
            "pid": os.getpid(),
        }
