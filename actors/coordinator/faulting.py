"""Fault firing on the coordinator's side: crashes, delays, corruptions, partitions, drops,
a crash of the coordinator itself, live injections, and the heartbeats that notice silent
workers.

Which fault fires when is decided by :class:`actors.faults.FaultEngine` (pure logic: one
class per kind in :mod:`actors.faults`, typed actions back); this module carries the
firings out for real (a SIGKILL of a worker's process, replies held back for a partition
window, the coordinator's own process killed) and records each as a typed event. What it
cannot do alone (lose a worker, deliver held replies, restart a worker) it returns in a
:class:`TickOutcome` for the loop to act on. On the receive path :meth:`Faulting.on_reply`
says what the network does with a reply (deliver, drop, hold).
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from dataclasses import dataclass, field

from actors.coordinator.recovery import Recovery
from actors.coordinator.reporting import Recovery as RecoveryTiming
from actors.coordinator.reporting import Reporter
from actors.coordinator.slot import WorkerSlot, kill_process
from actors.faults import (
    ActiveFault,
    CorruptOn,
    DelayOn,
    FaultEngine,
    KillCoordinator,
    KillWorker,
    PartitionHeal,
    PartitionStart,
    ReplyVerdict,
    Tick,
    TickAction,
    bind_plan,
)
from actors.messages import GradientReply
from core.events import EventKind, FaultKind
from core.spec import FaultSpec, JobSpec

# a busy worker silent for 20 mean round trips is hung (not merely slow): with round trips
# of ~10 ms that is 0.2 s, so heartbeat_timeout_s is the floor that matters on small models
HUNG_ROUNDTRIPS = 20.0


# The same exception raised by the task's code this many times (any workers, replacements
# included) fails the job: a replacement would only raise it again.
TASK_ERROR_REPEATS = 3


@dataclass
class Loss:
    """Take ``worker`` out of the membership (and with ``fatal``, fail the job: why)."""

    worker: WorkerSlot
    why: str
    keep_actor: bool = False  # its actor may come back (partition): no replacement now
    kill: bool = False  # kill its process too (it hangs)
    fatal: str | None = None


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def task_error(exc: BaseException) -> tuple[str, str, str] | None:
    """The exception a worker's own code raised while it computed (Ray's ``RayTaskError``:
    the process is alive, the call failed) as its type's name, where it was raised (the
    innermost frame of its traceback, ``file:line:function``, or ``""``) and ``Type:
    message``; ``None`` for a worker that died or any other failure."""
    if not type(exc).__module__.startswith("ray"):
        return None
    from ray.exceptions import RayTaskError

    cause = getattr(exc, "cause", None)
    if not isinstance(exc, RayTaskError) or not isinstance(cause, Exception):
        return None
    frames = _FRAME.findall(str(exc))  # Ray puts the remote traceback in the text
    kind = type(cause).__name__
    return kind, ":".join(frames[-1]) if frames else "", f"{kind}: {str(cause)[:200]}"


@dataclass
class TaskErrors:
    """The exceptions workers' computations raised, by type and the line that raised them
    (the message may name a sample, a shape: it varies). A worker that raises is lost and
    replaced, as a dead one (an error of its environment, say a shared-memory file gone with
    a restarted coordinator, goes with the process); the same exception from the same line
    ``repeats`` times is the task's own fault (a sample its dataset cannot read, a shape its
    model refuses), which replacements would raise again for ever: the job fails with it."""

    repeats: int = TASK_ERROR_REPEATS
    seen: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (type, where)

    def see(self, wid: int, exc: BaseException) -> tuple[str, str | None]:
        """Count ``exc`` of worker ``wid``: what it says (for the loss's event: a Ray
        error's first 200 characters, or the task's exception and where) and, once fatal,
        the job's error."""
        got = task_error(exc)
        if got is None:
            return f"{type(exc).__name__}: {str(exc)[:200]}", None
        kind, where, text = got
        said = f"the task raised {text} ({where or 'no traceback'}; the traceback is in the "
        said += "worker's log)"
        workers = self.seen.setdefault((kind, where), [])
        workers.append(wid)
        if len(workers) < self.repeats:
            return said, None
        who = ", ".join(str(w) for w in sorted(set(workers)))
        return said, (
            f"{said}; {len(workers)} gradient computations of workers {who} raised there: "
            "an error of the task's code, which replacing the worker would repeat (the "
            "worker's log: Ray's worker-*.err files of the job's session, or the dashboard)"
        )


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


def corruption_text(on: CorruptOn) -> str:
    """How a corruption window reads in its event (``scale x10``, ``nan, p=0.1 per gradient``)."""
    what = f"scale x{on.scale_factor:g}" if on.corruption == "scale" else on.corruption
    return what if on.probability is None else f"{what}, p={on.probability:g} per gradient"


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
        self.driver = FaultEngine(self.plan, spec.seed)
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
        started = [w for w in workers if not w.gone and w.state != "starting"]
        cut_off = frozenset(
            w.id
            for w in workers
            if w.partition_until is not None and (w.state == "dead" or w in started)
        )
        by_id = {w.id: w for w in workers}
        now = Tick(step, t_s, [w.id for w in started], cut_off)
        for action in self.driver.tick(now):
            self._act(action, by_id, out)
        for w in started:
            self._heartbeat(w, reply_deadline_s, out)
        return out

    def _act(self, action: TickAction, by_id: dict[int, WorkerSlot], out: TickOutcome) -> None:
        """Carry out one fault action and record its event."""
        match action:
            case KillCoordinator(step=step):
                self._crash_coordinator(step)
            case KillWorker(worker=wid, rejoin_after_s=rejoin_s):
                self._crash(by_id[wid], rejoin_s, out)
            case DelayOn(worker=wid, distribution=dist, delay_ms=delay_ms):
                self.reporter.event(
                    EventKind.FAULT,
                    f"straggler delay on: {dist}, mean {delay_ms:g} ms",
                    target=f"worker-{wid}",
                    fault=FaultKind.DELAY,
                )
            case CorruptOn(worker=wid):
                self.reporter.event(
                    EventKind.FAULT,
                    f"gradient corruption on: {corruption_text(action)}",
                    target=f"worker-{wid}",
                    fault=FaultKind.CORRUPT,
                )
            case PartitionStart(worker=wid):
                w = by_id[wid]
                w.partition_until = math.inf
                w.t_partition = time.time()
                self.reporter.event(
                    EventKind.FAULT,
                    "partition: worker cut off from the coordinator",
                    target=f"worker-{wid}",
                    fault=FaultKind.PARTITION,
                )
            case PartitionHeal(worker=wid):
                self._end_partition(by_id[wid], out)

    def _crash_coordinator(self, step: int) -> None:
        """SIGKILL this process (an injected coordinator crash); Ray restarts the actor."""
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

    def _crash(self, w: WorkerSlot, rejoin_after_s: float | None, out: TickOutcome) -> None:
        now = time.time()
        self.reporter.event(
            EventKind.FAULT,
            f"crash injected: SIGKILL pid {w.pid}",
            target=f"worker-{w.id}",
            fault=FaultKind.CRASH,
        )
        w.lost_at = None
        kill_process(w)
        self.reporter.recoveries.append(RecoveryTiming("crash", w.id, now))
        if rejoin_after_s is not None:
            out.joins.append((now + rejoin_after_s, w.id))

    def _end_partition(self, w: WorkerSlot, out: TickOutcome) -> None:
        """A partition window ended: deliver what a live worker's link held, or bring back
        a worker that was declared lost while cut off."""
        if w.state != "dead":
            self._heal(w, out)
            return
        self.reporter.event(
            EventKind.HEAL,
            "partition healed: worker reachable again",
            target=f"worker-{w.id}",
            fault=FaultKind.PARTITION,
        )
        w.partition_until = None
        out.restart.append(w)

    def _heartbeat(self, w: WorkerSlot, reply_deadline_s: float, out: TickOutcome) -> None:
        now = time.time()
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

    def on_reply(self, w: WorkerSlot, reply: GradientReply | None, t_s: float) -> ReplyVerdict:
        """What the network path does with ``w``'s reply (``None``: the call failed): held
        while ``w`` is cut off, lost on the way if the plan drops it (recorded as a fault
        and counted), else delivered."""
        step = None if reply is None else reply.step
        cut_off = w.partition_until is not None
        verdict = self.driver.on_reply(w.id, step, t_s, cut_off)
        if verdict is ReplyVerdict.DROP:
            self.dropped += 1
            self.reporter.event(
                EventKind.FAULT,
                f"gradient of step {step} dropped",
                target=f"worker-{w.id}",
                fault=FaultKind.DROP,
            )
        return verdict

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
