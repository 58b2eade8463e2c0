"""Fault firing on the coordinator's side: crashes, delays, partitions, drops, a crash of
the coordinator itself, live injections, and the heartbeats that notice silent workers.

Which fault fires when is decided by :class:`actors.fault_driver.FaultDriver` (pure logic);
this module carries the firings out for real (a SIGKILL of a worker's process, replies held
back for a partition window, the coordinator's own process killed) and records each as a
typed event. What it cannot do alone (lose a worker, deliver held replies, restart a worker)
it returns in a :class:`TickOutcome` for the loop to act on.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field

from actors.coordinator.membership import WorkerSlot, kill_process
from actors.coordinator.recovery import Recovery
from actors.coordinator.reporting import Recovery as RecoveryTiming
from actors.coordinator.reporting import Reporter
from actors.fault_driver import FaultDriver
from actors.faults import ActiveFault, bind_plan
from actors.messages import GradientReply
from core.events import EventKind, FaultKind
from core.spec import FaultSpec, JobSpec

# a busy worker silent for 20 mean round trips is hung (not merely slow): with round trips
# of ~10 ms that is 0.2 s, so heartbeat_timeout_s is the floor that matters on small models
HUNG_ROUNDTRIPS = 20.0


@dataclass
class Loss:
    """Take ``worker`` out of the membership."""

    worker: WorkerSlot
    why: str
    keep_actor: bool = False  # its actor may come back (partition): no replacement now
    kill: bool = False  # kill its process too (it hangs)


@dataclass
class TickOutcome:
    """What the loop must do after a tick."""

    # replies held back by a partition that has healed: handle them now
    deliver: list[tuple[WorkerSlot, GradientReply | None, BaseException | None]] = field(
        default_factory=list
    )
    lose: list[Loss] = field(default_factory=list)
    # partitioned workers declared lost whose window ended: close, kill and restart them
    restart: list[WorkerSlot] = field(default_factory=list)
    # (wall time due, worker id): planned rejoins after a crash
    joins: list[tuple[float, int]] = field(default_factory=list)


class Faulting:
    """The job's fault plan, carried out (see the module docstring).

    Args:
        spec: the job (its fault plan, seed and heartbeat timeout).
        reporter: fault events go here.
        recovery: where fired one-shot faults are saved before a coordinator crash.
    """

    def __init__(self, spec: JobSpec, reporter: Reporter, recovery: Recovery) -> None:
        self.spec = spec
        self.reporter = reporter
        self.recovery = recovery
        self.plan: list[ActiveFault] = []
        self.driver = FaultDriver(self.plan, spec.seed)
        self.dropped = 0

    def bind(self, worker_ids: list[int]) -> None:
        """Resolve the spec's plan against the initial workers."""
        self.plan[:] = bind_plan(self.spec.faults, worker_ids, self.spec.seed)

    def tick(
        self, step: int, t_s: float, workers: list[WorkerSlot], reply_deadline_s: float
    ) -> TickOutcome:
        """Fire due faults and watch heartbeats; once per loop turn.

        Args:
            step: the current step.
            t_s: seconds since the job started.
            workers: every slot (dead ones included: a healed partition brings them back).
            reply_deadline_s: how long a busy worker may stay silent.
        """
        out = TickOutcome()
        self._coordinator_crash(step)
        ready = [w for w in workers if not w.gone and w.state != "starting"]
        self._crashes(step, t_s, ready, out)
        for f, wid in self.driver.delays_started(step, t_s, [w.id for w in ready]):
            self.reporter.event(
                EventKind.FAULT,
                f"straggler delay on: {f.spec.distribution}, mean {f.spec.delay_ms:g} ms",
                target=f"worker-{wid}",
                fault=FaultKind.DELAY,
            )
        for w in ready:
            self._partition_and_heartbeat(w, step, t_s, reply_deadline_s, out)
        # partitioned workers declared lost come back when their window ends
        for w in workers:
            if (
                w.state == "dead"
                and w.partition_until is not None
                and self.driver.partition_active(w.id, step, t_s) is None
            ):
                self.reporter.event(
                    EventKind.HEAL,
                    "partition healed: worker reachable again",
                    target=f"worker-{w.id}",
                    fault=FaultKind.PARTITION,
                )
                w.partition_until = None
                out.restart.append(w)
        return out

    def _coordinator_crash(self, step: int) -> None:
        if self.driver.coordinator_crash_due(step) is None:
            return
        self.reporter.event(
            EventKind.FAULT,
            f"coordinator crash injected at step {step}",
            target="coordinator",
            fault=FaultKind.COORDINATOR_CRASH,
        )
        # the restarted coordinator must not fire this one-shot fault again
        self.recovery.save_fired(self.driver.fired)
        self.reporter.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def _crashes(self, step: int, t_s: float, ready: list[WorkerSlot], out: TickOutcome) -> None:
        now = time.time()
        by_id = {w.id: w for w in ready}
        for f, wid in self.driver.crashes_due(step, t_s, list(by_id)):
            w = by_id[wid]
            self.reporter.event(
                EventKind.FAULT,
                f"crash injected: SIGKILL pid {w.pid}",
                target=f"worker-{wid}",
                fault=FaultKind.CRASH,
            )
            w.lost_at = None
            kill_process(w)
            self.reporter.recoveries.append(RecoveryTiming("crash", wid, now))
            if f.spec.rejoin_after_s is not None:
                out.joins.append((now + f.spec.rejoin_after_s, wid))

    def _partition_and_heartbeat(
        self, w: WorkerSlot, step: int, t_s: float, reply_deadline_s: float, out: TickOutcome
    ) -> None:
        now = time.time()
        p = self.driver.partition_active(w.id, step, t_s)
        if p is not None and w.partition_until is None:
            w.partition_until = math.inf
            w.t_partition = now
            self.reporter.event(
                EventKind.FAULT,
                "partition: worker cut off from the coordinator",
                target=f"worker-{w.id}",
                fault=FaultKind.PARTITION,
            )
        elif p is None and w.partition_until is not None:
            self._heal(w, out)
        timeout_s = self.spec.heartbeat_timeout_s
        if w.partition_until is not None and now - w.t_partition > timeout_s:
            why = f"no heartbeat for {timeout_s:g} s (partitioned)"
            out.lose.append(Loss(w, why, keep_actor=True))
        elif (
            w.state == "busy"
            and w.partition_until is None
            and time.perf_counter() - w.t_dispatch > reply_deadline_s
        ):
            out.lose.append(Loss(w, f"no reply for {reply_deadline_s:.1f} s", kill=True))

    def _heal(self, w: WorkerSlot, out: TickOutcome) -> None:
        """A partition shorter than the heartbeat timeout ends: deliver what was held."""
        w.partition_until = None
        self.reporter.event(
            EventKind.HEAL,
            "partition healed: held replies delivered",
            target=f"worker-{w.id}",
            fault=FaultKind.PARTITION,
        )
        if w.partition_held is not None:
            res, exc = w.partition_held
            w.partition_held = None
            out.deliver.append((w, res, exc))

    def reply_deadline_s(self, mean_roundtrip_s: float) -> float:
        """How long a busy worker may stay silent before it counts as lost."""
        return max(self.spec.heartbeat_timeout_s, HUNG_ROUNDTRIPS * mean_roundtrip_s)

    def drop_due(self, w: WorkerSlot, reply: GradientReply, t_s: float) -> bool:
        """True if the plan loses this gradient message on the way (recorded as a fault)."""
        if self.driver.drop_due(w.id, reply.step, t_s) is None:
            return False
        self.dropped += 1
        self.reporter.event(
            EventKind.FAULT,
            f"gradient of step {reply.step} dropped",
            target=f"worker-{w.id}",
            fault=FaultKind.DROP,
        )
        return True

    def inject(self, fault: FaultSpec, live: list[WorkerSlot], step: int) -> None:
        """Add a fault to the running plan (targets resolved now, among live workers)."""
        ids = sorted(w.id for w in live)
        bound = bind_plan([fault], ids, self.spec.seed)[0]
        bound.index = len(self.plan)
        if (
            fault.at_step is None
            and fault.at_s is None
            and fault.steps is None
            and fault.probability is None
        ):
            # "now": a fault with no trigger fires at the current step
            bound.spec = fault.model_copy(update={"at_step": step})
        self.driver.add(bound)  # self.plan is the driver's list
        for w in live:
            w.send_plan = True
        self.reporter.event(
            EventKind.INJECT,
            f"injected {fault.kind}",
            target=",".join(f"worker-{t}" for t in bound.targets),
            fault=FaultKind(fault.kind),
        )
