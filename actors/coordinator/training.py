"""The data flow of one step: dispatch views, take replies in, apply updates, record them.

A reply goes through the fault plan's network path (:meth:`Faulting.on_reply`: delivered,
dropped or held) and then the finite-value screen (:func:`actors.faults.screen_gradient`): a
gradient with a NaN or an infinite entry is refused, counted and recorded, and the mode
treats it as lost (in the step modes its step counts it as missing, without a copy for the
B̂ monitor: it is no part of the consistent model); only the rest reach the mode.

:class:`Training` owns the model of record, the consistency mode, the B̂ meter and the data
plane, and the futures of the requests in flight. The loop hands it replies; it returns
what the loop must do about the membership (a worker to take out) rather than doing it.
After every update the mode applies it records the step, evaluates on schedule, empties the
view cache and checkpoints when due, in that order, so each sees the model of its own step.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset

from actors.checkpoint import list_checkpoints
from actors.consistency import ConsistencyMonitor, Meter, ObservedNorms
from actors.coordinator import snapshot
from actors.coordinator.dataplane import DataPlane, Outcome
from actors.coordinator.evaluation import Evaluation
from actors.coordinator.faulting import Faulting, Loss, TaskErrors
from actors.coordinator.guarding import Guarding
from actors.coordinator.membership import Membership
from actors.coordinator.recovery import CheckpointState, Recovery
from actors.coordinator.reporting import Reporter
from actors.coordinator.slot import WorkerSlot
from actors.faults import GradientVerdict, ReplyVerdict, screen_gradient
from actors.guard import Action, Condition, Decision
from actors.messages import BlockReady, GradientReply
from actors.modes.base import Applied, Mode, ModelOfRecord
from actors.tasks.base import Task
from core.events import EventKind, FaultKind
from core.spec import JobSpec


class Training:
    """See the module docstring.

    Args:
        spec: the job.
        mode: the consistency mode (it updates the model of record).
        meter: the B̂ meter the mode writes to.
        norms: observed norms (the bound's constants).
        q: the compressor's error factor (the residual bound).
        evaluation: the task, a model to load the model of record into (in eval mode),
            and the task's evaluation set.
        parts: the collaborators: data plane, membership, faults, recovery, reporter.
    """

    def __init__(
        self,
        spec: JobSpec,
        mode: Mode,
        meter: Meter,
        norms: ObservedNorms,
        q: float,
        evaluation: tuple[Task, torch.nn.Module, TorchDataset[Any]],
        parts: tuple[DataPlane, Membership, Faulting, Recovery, Reporter],
    ) -> None:
        self.spec = spec
        self.mode = mode
        self.record: ModelOfRecord = mode.model
        self.meter = meter
        self.norms = norms
        self.q = q
        self.data, self.members, self.faults, self.recovery, self.reporter = parts
        task, net, eval_set = evaluation
        self.evaluation = Evaluation(spec, task, net, eval_set, self.record, self.members)
        self.inflight: dict[int, asyncio.Future[Outcome]] = {}
        self.lost_idle: list[Loss] = []  # workers whose serving loop ended between requests
        self.task_errors = TaskErrors()  # what workers' task code raised, by type and line
        self.wake = asyncio.Event()  # set when lost_idle gets one (the loop acts at once)
        self.samples = 0
        self.refused = 0
        self.corrupted = 0  # replies the injector marked corrupted (accounting only)
        self.refused_nonfinite = 0  # gradients refused for a NaN or an infinite entry
        # the bound stated after the warm-up, and the guard (docs/consistency.md: the guard)
        self.guard = Guarding(
            spec,
            mode,
            meter.monitor,
            (q, meter.error_feedback),
            self.reporter,
            self.faults.plan,
        )
        # a guard decision the loop must act on (fail, or a rollback once drained)
        self.pending: Decision | None = None
        self.draining = False  # a rollback waits for the requests in flight
        self.steps_all_lost = 0  # steps whose every gradient was lost (missing gradients)
        self.own_threads = torch.get_num_threads()  # what Ray gave this actor (its CPUs)
        self.host_cores = len(os.sched_getaffinity(0))  # what apply_threads may borrow up to

    @property
    def monitor(self) -> ConsistencyMonitor:
        return self.meter.monitor

    def bound(self) -> float | None:
        """The stated bound (``None``: still in the warm-up, or not finite)."""
        return self.guard.stated

    def consistency(self) -> dict[str, Any]:
        """The summary's consistency section (:meth:`Guarding.consistency`)."""
        return self.guard.consistency(self.norms)

    # -- transports of a worker ------------------------------------------------------------
    def attach(self, slot: WorkerSlot) -> None:
        """A probed worker: open its channel (same host) and let the mode schedule it."""
        if slot.shm:
            wid, gen = slot.id, slot.gen
            ref = self.data.open_channel(slot, lambda msg: self._on_pipe_reply(wid, gen, msg))
            slot.serve_task = asyncio.ensure_future(self._watch(wid, gen, ref))
        self.mode.join(slot.id)

    async def _watch(self, wid: int, gen: int, ref: Any) -> None:
        """The worker's serving call ended: it died (data, not a crash) or was told to stop."""
        try:
            await ref
            exc: BaseException | None = None
        except Exception as e:  # noqa: BLE001 - the worker died: data, not a crash
            exc = e
        w = self.members.workers.get(wid)
        if w is None or w.gen != gen or w.gone:
            return
        fut = self.inflight.get(wid)
        err = exc or RuntimeError("the worker's serving loop ended")
        if fut is not None and not fut.done():
            fut.set_result((wid, gen, None, err))
        else:
            self.lost_idle.append(Loss(w, f"worker lost while idle: {type(err).__name__}"))
            self.wake.set()

    def _on_pipe_reply(self, wid: int, gen: int, msg: GradientReply | BlockReady) -> None:
        if isinstance(msg, BlockReady):
            self._on_block(wid, gen, msg)
            return
        fut = self.inflight.get(wid)
        if fut is not None and not fut.done():
            fut.set_result((wid, gen, msg, None))

    # -- per-block streaming (modes with ``streams_blocks``) -------------------------------------
    def _streams(self, w: WorkerSlot) -> bool:
        """Whether ``w`` should announce its gradient block by block: a mode that applies per
        block, a same-host channel, no compression, and no fault plan that could still lose,
        hold back or corrupt the message (a dropped or partitioned reply must take all its
        blocks; a corrupt one is screened whole before any of it is applied)."""
        return (
            self.mode.streams_blocks
            and w.channel is not None
            and self.spec.compression.name == "none"
            and self.mode.local_steps() == 1
            and not any(f.spec.kind in ("drop", "partition", "corrupt") for f in self.faults.plan)
        )

    def _on_block(self, wid: int, gen: int, msg: BlockReady) -> None:
        """A block of an in-flight gradient is in ``wid``'s slot: fold it in and apply what
        became applicable; the loop then schedules whoever may start."""
        w = self.members.workers.get(wid)
        fut = self.inflight.get(wid)
        if w is None or w.gen != gen or w.gone or fut is None or fut.done():
            return
        if w.partition_until is not None or self.data.shm is None:
            return  # the reply carries every block
        grad = self.data.shm.grad(wid)
        blocks = self.record.opt.blocks
        if 0 <= msg.block < len(blocks):
            lo, hi = blocks[msg.block]
            if screen_gradient(grad[lo:hi]) is not GradientVerdict.ACCEPT:
                # never applied, not even this block: the reply's whole screen refuses
                # the gradient (counted and recorded there)
                return
        if self.mode.on_block(w, msg.step, msg.block, msg.norm, grad, msg.loss):
            self.apply_ready()
            self.wake.set()

    def leave(self, w: WorkerSlot) -> list[int]:
        """``w`` leaves: nothing more is expected from it; returns the steps it left."""
        self.inflight.pop(w.id, None)
        self.data.close_channel(w)
        self.data.release_view(w)
        return self.mode.leave(w.id)

    # -- the step ------------------------------------------------------------------------------
    def schedule(self) -> None:
        """Start every worker the mode lets start (nobody while a rollback drains)."""
        if self.draining or self.pending is not None:
            return
        live = self.members.live()
        for d in self.mode.schedule(live):
            w = self.members.workers[d.worker]
            want_residual = self.meter.error_feedback and (
                w.steps_done % self.spec.monitor_interval == 0
            )
            req = self.data.request(
                w,
                d,
                want_residual=want_residual,
                local_steps=self.mode.local_steps(),
                plan=self.faults.plan,
            )
            req.stream_blocks = self._streams(w)
            if req.local_steps > 1:  # local SGD steps at the round's lr (the schedule's)
                req.local_lr = self.mode.model.opt.lr
            w.t_dispatch = time.perf_counter()
            self.inflight[w.id] = self.data.send(w, req)

    def handle_reply(
        self, w: WorkerSlot, reply: GradientReply | None, exc: BaseException | None
    ) -> Loss | None:
        """One reply (or failure) from a worker, through the fault plan's network path and
        the finite-value screen (a non-finite gradient is refused, never applied).

        Returns:
            The worker to take out of the membership, if the reply says it is lost.
        """
        t_s = time.time() - self.reporter.t0
        verdict = self.faults.on_reply(w, None if exc is not None else reply, t_s)
        if verdict is ReplyVerdict.HOLD:
            w.partition_held = (reply, exc)  # the message waits out the partition
            return None
        if exc is not None or reply is None:
            # a Ray error's first line, or the task's exception (the traceback stays in the
            # worker's log)
            said, fatal = self.task_errors.see(w.id, exc or RuntimeError("no reply"))
            return Loss(w, f"worker lost: {said}", fatal=fatal)
        self.data.release_view(w)
        if self.draining:  # computed on a model the rollback discards
            self.mode.leave(w.id)
            w.state = "idle"
            return None
        grad = self.data.decode(w, reply)
        if verdict is ReplyVerdict.DROP:
            self._seen(w, reply, counted=False)
            # the lost gradient is kept for the B̂ monitor only
            if self.mode.on_lost(w, reply, grad):
                self.reporter.event(
                    EventKind.MISSING,
                    f"step {reply.step}: gradient missing, policy {self.spec.missing_policy}",
                    target=f"worker-{w.id}",
                    fault=FaultKind.DROP,
                )
        elif not self._refuse_nonfinite(w, reply, grad):
            mode_verdict = self.mode.on_reply(w, reply, grad)
            if mode_verdict.unexpected:
                self.reporter.event(
                    EventKind.REFUSED,
                    f"unexpected gradient for step {reply.step} ignored",
                    target=f"worker-{w.id}",
                )
                return None
            self.refused += mode_verdict.refused_stale
            self._seen(w, reply, counted=True)
            if mode_verdict.accepted:
                self.guard.see_reply(w.id, reply, grad)
        self.apply_ready()
        return None

    def _refuse_nonfinite(self, w: WorkerSlot, reply: GradientReply, grad: torch.Tensor) -> bool:
        """The defence against corrupt gradients: a gradient with a NaN or an infinite entry
        is refused (never applied), counted and recorded; True if it was.

        The mode treats it as lost without a copy for B̂: in the step modes it counts as
        missing (the missing policy decides, as for a dropped one), in async mode it is
        simply not applied. A finite gradient passes, however large (a scaled one is
        applied: the size of an update is the consistency guard's business).
        """
        self.corrupted += int(reply.corrupted)  # the injector's mark: accounting only
        if screen_gradient(grad) is GradientVerdict.ACCEPT:
            return False
        self.refused_nonfinite += 1
        self._seen(w, reply, counted=False)
        missing = self.mode.on_lost(w, reply, None)
        then = f"missing, policy {self.spec.missing_policy}" if missing else "not applied"
        self.reporter.event(
            EventKind.REFUSED,
            f"step {reply.step}: non-finite gradient refused, never applied; {then}",
            target=f"worker-{w.id}",
            fault=FaultKind.CORRUPT if reply.corrupted else None,
        )
        return True

    def _seen(self, w: WorkerSlot, reply: GradientReply, counted: bool) -> None:
        """Bookkeeping of a reply that arrived (``counted``: not lost on the way)."""
        self.reporter.timing.see(reply, time.perf_counter() - w.t_dispatch)
        w.sampler = reply.sampler_pos
        if reply.buffers is not None:
            self.evaluation.worker_buffers[w.id] = reply.buffers
        if not counted:
            return
        w.steps_done += 1
        self.samples += reply.n
        self.norms.see_grad(reply.sent_norm, reply.raw_norm)
        if reply.residual is not None:
            self.meter.residuals[w.id] = reply.residual

    def apply_ready(self) -> None:
        """Apply what became applicable; record, evaluate, checkpoint after each update."""
        if self.draining or self.pending is not None:
            return
        with self._idle_cores():
            for applied in self.mode.apply_ready():
                self._after_update(applied)
                if self.pending is not None:
                    break  # the loop acts first (fail, or drain for a rollback)

    def apply_threads(self) -> int:
        """Torch threads for applying (and evaluating, checkpointing) an update: see
        :func:`borrowed_threads`; only in a mode that changes the model of record while
        every worker waits for it (``shares_model_slot``: sync, local) and on the CPU."""
        if not self.mode.shares_model_slot or self.record.x.device.type != "cpu":
            return self.own_threads
        near = sum(1 for w in self.members.live() if w.shm)
        return borrowed_threads(
            self.own_threads, near, self.spec.resources.torch_threads, self.host_cores
        )

    @contextlib.contextmanager
    def _idle_cores(self) -> Iterator[None]:
        n = self.apply_threads()
        timing = self.reporter.timing
        timing.apply_threads = max(timing.apply_threads, n)
        if n == self.own_threads:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(self.own_threads)

    def _after_update(self, applied: Applied) -> None:
        self.reporter.timing.see_apply(applied.apply_s)
        self.reporter.note_update()
        self.data.invalidate()
        if applied.lost_step is not None:  # counted and said (missing gradients)
            self.steps_all_lost += 1
            self.reporter.all_lost(applied.lost_step, self.spec.missing_policy, self.steps_all_lost)
        if not applied.record:
            return
        self.reporter.step_record(
            loss=applied.loss,
            samples=self.samples,
            b_hat=self.meter.last,
            b_hat_max=self.monitor.b_max,
            bound=self.bound(),
            workers=len(self.members.live()),
            refused=self.refused,
        )
        step = self.mode.step
        decision = self.guard.after_step(
            step, applied.loss, self.record.x, self.can_rollback(), self.record.opt.applied_lr
        )
        self._act(decision)
        if self.pending is not None:
            return
        if step % self.spec.eval_interval == 0 or step >= self.mode.total_steps:
            self.evaluate()
        # only a run inside its bound and healthy (a loss no worse than its first) leaves a
        # checkpoint (a rollback's destination), and only when the model of record is
        # exactly one step's (per-block modes)
        if (
            decision.condition is Condition.WITHIN
            and applied.consistent
            and self.guard.policy.healthy(applied.loss)
            and self.recovery.checkpoint_due(step)
        ):
            self.checkpoint()
        while self.recovery.notes:
            self.reporter.event(EventKind.WARNING, self.recovery.notes.pop(0), step=step)

    # -- the guard's actions -----------------------------------------------------------------
    def can_rollback(self) -> bool:
        """A checkpoint to return to exists (they are written only inside the bound)."""
        d = self.recovery.ckpt_dir
        return d is not None and bool(list_checkpoints(d))

    def _act(self, d: Decision) -> None:
        """Warn and tighten here; a failure or a rollback is the loop's (:attr:`pending`)."""
        if d.action is Action.WARN:
            self.guard.warn(d)
        elif d.action is Action.TIGHTEN:
            done = self.guard.tighten(d.reason)
            if done is None:  # nothing stricter after all: fail rather than go on out of bound
                self.pending = Decision(d.condition, Action.FAIL, d.reason)
            else:
                self.refused += done[1]
        elif d.action is Action.ROLLBACK:
            self.pending, self.draining = d, True
        elif d.action is Action.FAIL:
            self.pending = d

    def finish_rollback(self) -> str | None:
        """Drained: back to the last checkpoint with a stricter setting
        (:func:`actors.coordinator.snapshot.roll_back`); why it could not, else ``None``."""
        d = self.pending
        assert d is not None and self.draining
        self.draining = False
        why = snapshot.roll_back(self, d.reason)
        if why is None:
            self.pending = None
        return why

    # -- evaluation and checkpoints ------------------------------------------------------------
    def evaluate(self) -> None:
        """The task's evaluation metrics of the model of record, recorded."""
        metrics = self.evaluation.metrics()
        self.reporter.eval_record(metrics, len(self.members.live()))

    def checkpoint(self) -> None:
        """Write a checkpoint of the run as it is now (:mod:`actors.coordinator.snapshot`)."""
        t_build = time.perf_counter()
        state = snapshot.take(self)
        path = self.recovery.write(state, build_s=time.perf_counter() - t_build)
        self.reporter.event(EventKind.CHECKPOINT, f"step {self.mode.step} -> {path.name}")

    def restore(self, st: CheckpointState, guard_state: bool = True) -> None:
        """Continue from checkpoint ``st`` (:func:`actors.coordinator.snapshot.restore`)."""
        snapshot.restore(self, st, guard_state)


def borrowed_threads(own: int, waiting_near: int, per_worker: int, cores: int) -> int:
    """The coordinator's torch threads while ``waiting_near`` of the job's workers on its
    host (``per_worker`` threads each) wait for the update it applies: its own, plus
    theirs (they hold those cores and leave them idle until the update is out), at most
    the host's ``cores``; never fewer than its own.

    Measured on this 2-core machine (1.6M parameters: the sum of two gradients, the fused
    SGD step and the finite screens): 2.37 ms on one thread, 1.31 ms on two.
    """
    return max(own, min(cores, own + waiting_near * per_worker))
