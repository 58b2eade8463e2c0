"""The coordinator's loop: model of record, the mode, membership, faults, wired together.

One asyncio loop drives the job. Each live worker has at most one gradient request in
flight; when a reply arrives the loop passes it through the fault plan's network path
(:mod:`.faulting`) to the consistency mode (:mod:`actors.modes`), which folds it in and
applies every update that became applicable; then the mode says which waiting workers may
start next, on which view, and the data plane (:mod:`.dataplane`) sends those views.

The collaborators decide and report; this class acts: :mod:`.membership` (who is in the
job) and :mod:`.staffing` (bringing workers in, taking them out), :mod:`.dataplane` (views,
transports, gradient decoding), :mod:`.recovery` (checkpoints, journal, resume),
:mod:`.reporting` (records, events, summary), :mod:`.faulting` (fault firing, heartbeats)
and B̂ measurement (:class:`Meter`, used by the mode: every view handed out is compared with
the consistent model of the iteration it is used at). Control calls (``poll``, ``scale``,
``inject``, ``cancel``) are other coroutines on the same loop.
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import torch

from actors.compression import error_factor
from actors.consistency import ConsistencyMonitor, Meter, ObservedNorms
from actors.coordinator.dataplane import DataPlane
from actors.coordinator.evaluation import open_task
from actors.coordinator.faulting import Faulting
from actors.coordinator.membership import Membership, worker_template
from actors.coordinator.recovery import Recovery
from actors.coordinator.reporting import Reporter, RunFacts
from actors.coordinator.slot import WorkerSlot, kill_process
from actors.coordinator.staffing import Life, Staffing
from actors.coordinator.training import Training
from actors.flat import ParamLayout, flatten
from actors.guard import Action, Decision
from actors.messages import Launch
from actors.modes.base import ModeContext, ModelOfRecord
from actors.modes.registry import make_mode
from actors.optim import RecordOptimizer
from core.errors import InvalidTransition
from core.events import EventKind
from core.spec import FaultSpec, JobSpec
from core.state import JobState

# the loop wakes at least this often: faults (at_s triggers, partitions) and heartbeats are
# checked on every turn, so they act within 0.2 s; an idle turn costs microseconds
TICK_S = 0.2


class CoordinatorCore:
    """The coordinator's logic; :class:`~actors.coordinator.actor.Coordinator` is the Ray
    actor around it.

    Args:
        job_id: the job's id (names actors and shared-memory files).
        spec: the job.
        data_dir: where ``npz`` datasets live.
        state_dir: checkpoints, journal and members file (``None``: not resumable).
        resume: continue from the latest checkpoint in ``state_dir`` (as after a crash).
        launch: what each worker asks Ray for and how long its start may take.
    """

    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        data_dir: str | None = None,
        state_dir: str | None = None,
        resume: bool = False,
        launch: Launch | None = None,
    ) -> None:
        self.job_id, self.spec, self.resume = job_id, spec, resume
        self.state = JobState.STARTING
        self.error: str | None = None
        self.t_run: float | None = None
        self.t_end: float | None = None
        self.data_dir = data_dir
        # the job's task (docs/tasks.md): a raise in its model or data fails the start here,
        # with the task's own message (the traceback is in this actor's log)
        self.task, self.model, self.eval_set, n_train = open_task(spec, data_dir)
        self.layout = ParamLayout.of(self.model)
        self.total_steps = spec.total_steps(n_train)
        q, _ = error_factor(spec.compression, self.layout.numel)
        ef = spec.compression.name != "none" and spec.compression.error_feedback
        self.norms = ObservedNorms()
        self.meter = Meter(
            ConsistencyMonitor(window=spec.guard.window_steps), ef, spec.monitor_interval
        )
        self.meter.live_workers = lambda: len(self.members.live())
        self.record = ModelOfRecord(
            RecordOptimizer(
                spec.applied_optimizer(), flatten(self.model), self.layout, self.total_steps
            )
        )
        self.mode = make_mode(
            ModeContext(
                spec, self.total_steps, self.record, self.meter, self.norms, self.layout.blocks()
            )
        )
        self.recovery = Recovery(Path(state_dir) if state_dir else None, spec.checkpoint)
        self.reporter = Reporter(time.time(), self.recovery.journal, lambda: self.mode.step)
        self.members = Membership(job_id, spec, self.reporter, n_train, launch)
        self.data = DataPlane(job_id, spec, self.layout.numel)
        self.faults = Faulting(spec, self.reporter, self.recovery)
        self.train = Training(
            spec,
            self.mode,
            self.meter,
            self.norms,
            q,
            (self.task, self.model, self.eval_set),
            (self.data, self.members, self.faults, self.recovery, self.reporter),
        )
        self.restarts = self.steps_lost = 0
        self.cancel_requested = False
        self._wake = self.train.wake  # one event wakes the loop, whoever has news
        self.staff = Staffing(
            spec,
            self.members,
            self.train,
            (self.data, self.recovery, self.reporter),
            Life(
                winding_down=lambda: (
                    self.state.terminal or self.cancel_requested or self.mode.finished()
                ),
                ended=lambda: self.state.terminal,
                fail=lambda why: self._set_state(JobState.FAILED, why),
                wake=self._wake.set,
            ),
        )

    @property
    def step(self) -> int:
        return self.mode.step

    @property
    def t0(self) -> float:
        """The job's start (wall time); kept across coordinator restarts."""
        return self.reporter.t0

    def _set_state(self, state: JobState, why: str) -> None:
        if state == self.state:
            return
        if state is JobState.FAILED and self.error is None:
            self.error = why  # the job's reason, whichever path failed it
        old, self.state = self.state, state
        self.reporter.event(EventKind.STATE, f"{old.value} -> {state.value}: {why}")
        self._wake.set()

    # -- start-up and resume -----------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Create the workers (the job's initial membership), resuming if asked to."""
        self.record.x = self.data.open(self.record.x, self.mode.shares_model_slot)
        ids = list(range(self.spec.workers))
        self.faults.bind(ids)
        samplers: dict[int, dict[str, Any]] = {}
        if (self.resume or self.recovery.reconstructed()) and self.recovery.state_dir:
            ids, samplers = self._resume()
        self.members.cut_shards(ids)
        members = self.recovery.load_members() if samplers else {}
        self.members.template = worker_template(self.spec, self.data_dir, self.faults.plan, self.t0)
        await asyncio.gather(*(self.staff.bring(w, members, samplers) for w in ids))
        live = self.members.live()
        if len(live) < self.spec.min_workers:
            why = f"only {len(live)} workers started; min_workers={self.spec.min_workers}"
            if self.members.start_failure is not None:
                why += f"; {self.members.start_failure}"
            self.error = why
            self._set_state(JobState.FAILED, why)
        else:
            self.staff.replace_unstarted(ids)
        return {
            "workers": [w.public() for w in live],
            "total_steps": self.total_steps,
            "parameters": self.layout.numel,
        }

    def _resume(self) -> tuple[list[int], dict[int, dict[str, Any]]]:
        """Restore the latest valid checkpoint and the journal; returns workers to start."""
        got = self.recovery.resume(self.reporter, self.spec.workers)
        if got.t0 is not None:
            self.t_run = got.t0
        self.restarts, self.steps_lost = got.restarts, self.steps_lost + got.steps_lost
        self.faults.driver.fired.update(got.fired)
        if got.state is not None:
            self.train.restore(got.state)
        return got.workers, got.samplers

    async def scale(self, n: int) -> dict[str, Any]:
        """Grow or shrink the job to ``n`` workers while it runs; data is re-sharded.

        Raises:
            InvalidRequest: ``n`` is outside ``[min_workers, max_workers]``.
            InvalidTransition: the job has ended.
        """
        self.members.check_size(n)
        if self.state.terminal:
            raise InvalidTransition(f"scale: the job is already {self.state.value}")
        self.staff.resize(n)
        return {"workers": n}

    # -- the loop ------------------------------------------------------------------------------
    def _tick(self) -> None:
        """Fire due faults, watch heartbeats, bring back workers; once per loop turn."""
        now = time.time()
        deadline_s = self.faults.reply_deadline_s(self.reporter.timing.mean_roundtrip_s)
        out = self.faults.tick(
            self.step, now - self.t0, list(self.members.workers.values()), deadline_s
        )
        for w, res, exc in out.deliver:
            self._handle(w, res, exc)
        for loss in [*out.lose, *self.train.lost_idle]:
            self.staff.apply_loss(loss)
        self.train.lost_idle.clear()
        for w in out.restart:
            self.data.close_channel(w)
            kill_process(w)
            self.members.pending_joins.append((now, w.id))
        self.members.pending_joins.extend(out.joins)
        for i, a in enumerate(self.spec.scale_plan):
            key = f"scale:{i}"  # fired once, remembered across restarts like a fault
            if key not in self.faults.driver.fired and self.step >= a.at_step:
                self.faults.driver.fired.add(key)
                self.staff.spawn(self.scale(a.workers))
        for wid in self.members.due_joins(now):
            self.staff.start_join(wid)

    def _handle(self, w: WorkerSlot, res: Any, exc: BaseException | None) -> None:
        loss = self.train.handle_reply(w, res, exc)
        if loss is not None:
            self.staff.apply_loss(loss)

    async def run(self) -> dict[str, Any]:
        """Train until every step is applied, the job fails, or it is cancelled."""
        if self.state == JobState.STARTING:
            self._set_state(JobState.RUNNING, f"{len(self.members.live())} workers")
            for note in self.mode.start_notes():
                self.reporter.event(EventKind.WARNING, note)
        if self.t_run is None:
            self.t_run = time.time()
        self.train.evaluate()
        if (
            self.spec.guard.on_diverged == "rollback"
            and self.step == 0
            and self.recovery.ckpt_dir is not None
        ):
            self.train.checkpoint()  # a rollback can always return to the start
        wake: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
        while not self.state.terminal and not self._should_stop():
            self._tick()
            if self.state.terminal:
                break
            if not self.cancel_requested:
                self.train.schedule()
            self.recovery.flush()
            waiting = set(self.train.inflight.values())
            if not waiting and not self.members.live() and not self.members.pending_joins:
                self._set_state(JobState.FAILED, "no live workers")
                break
            done, _ = await asyncio.wait(
                waiting | {wake}, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED
            )
            if wake in done:
                done.discard(wake)
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
            for fut in done:
                self._arrived(fut)
        wake.cancel()
        self.recovery.flush()
        self.t_end = time.time()
        if self.state == JobState.SUCCEEDED or self.step > 0:
            self.train.evaluate()
        return self.summary()

    def _should_stop(self) -> bool:
        """Cancelled, failed by the guard, or finished: set the final state and say so."""
        self._guard_act()
        if self.state.terminal:
            return True
        if self.cancel_requested:
            self._set_state(JobState.CANCELLED, "cancel requested")
            return True
        if self.mode.finished():
            self._set_state(JobState.SUCCEEDED, f"{self.step} steps applied")
            return True
        return False

    # -- the consistency guard (docs/consistency.md: the guard) -------------------------------
    def _guard_act(self) -> None:
        """Act on the guard's pending decision: fail the job, or roll back once drained."""
        d = self.train.pending
        if d is None or self.state.terminal:
            return
        why: str | None = d.reason
        if d.action is Action.ROLLBACK:
            if self.train.inflight:
                return  # still draining: the requests in flight are discarded as they land
            why = self.train.finish_rollback()
            if why is None:
                self._wake.set()
                return
        self.error = why
        self.train.guard.failed(Decision(d.condition, Action.FAIL, why or d.reason))
        self._set_state(JobState.FAILED, why or d.reason)

    def _arrived(self, fut: asyncio.Future[Any]) -> None:
        wid, gen, res, exc = fut.result()
        w = self.members.workers.get(wid)
        if w is None or w.gen != gen or self.train.inflight.get(wid) is not fut:
            return  # an older incarnation's, or a request already given up on
        self.train.inflight.pop(wid, None)
        self._handle(w, res, exc)

    # -- control & reporting ------------------------------------------------------------------
    def poll(self, ack_seq: int = 0) -> dict[str, Any]:
        """New records and events since ``ack_seq`` (older ones are dropped as delivered)."""
        records, events = self.reporter.poll(ack_seq)
        return {"records": records, "events": events, "status": self.status()}

    def status(self) -> dict[str, Any]:
        summ = self.meter.monitor.summary(self.train.bound())
        return {
            "state": self.state.value,
            "step": self.step,
            "total_steps": self.total_steps,
            "workers": [w.public() for w in self.members.workers.values()],
            "b_hat_max": summ["b_hat_max"],
            "b_hat_mean": summ["b_hat_mean"],
            "bound": summ["bound"],
            "error": self.error,
            "test_accuracy": self.reporter.last_eval.get("test_accuracy"),
            "test_loss": self.reporter.last_eval.get("test_loss"),
        }

    def cancel(self) -> None:
        self.cancel_requested = True
        self._wake.set()

    def model_bytes(self) -> bytes:
        self.train.evaluation.load_model()
        buf = io.BytesIO()
        state = {"state_dict": self.model.state_dict(), "spec": self.spec.model_dump()}
        torch.save({**state, "step": self.step}, buf)
        return buf.getvalue()

    def summary(self) -> dict[str, Any]:
        return self.reporter.summary(
            RunFacts(
                job_id=self.job_id,
                spec=self.spec,
                state=self.state.value,
                error=self.error,
                steps=self.step,
                total_steps=self.total_steps,
                updates=self.record.version,
                samples=self.train.samples,
                workers_final=len(self.members.live()),
                refused=self.train.refused,
                dropped=self.faults.dropped,
                corrupted=self.train.corrupted,
                refused_nonfinite=self.train.refused_nonfinite,
                steps_all_lost=self.train.steps_all_lost,
                restarts=self.restarts,
                steps_lost=self.steps_lost,
                parameters=self.layout.numel,
                consistency=self.train.consistency(),
                t_start=self.t_run or self.t0,
                t_end=self.t_end,
            )
        )

    def inject(self, fault: FaultSpec) -> None:
        """Add a fault to the running plan (targets resolved now, among live workers)."""
        self.faults.inject(fault, self.members.live(), self.step)
        if fault.kind == "drop":  # the drop share is part of the bound: state it again
            self.train.guard.state_bound("restated", "for an injected drop fault")

    async def shutdown(self) -> None:
        for w in self.members.workers.values():
            self.data.close_channel(w)
        self.members.kill_all()
        self.data.close()
