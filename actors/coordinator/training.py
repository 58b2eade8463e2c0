"""The data flow of one step: dispatch views, take replies in, apply updates, record them.

:class:`Training` owns the model of record, the consistency mode, the B̂ meter and the data
plane, and the futures of the requests in flight. The loop hands it replies; it returns
what the loop must do about the membership (a worker to take out) rather than doing it.
After every update the mode applies it records the step, evaluates on schedule, empties the
view cache and checkpoints when due, in that order, so each sees the model of its own step.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import torch

from actors.consistency import ConsistencyMonitor, Meter, ObservedNorms
from actors.coordinator.dataplane import DataPlane, Outcome
from actors.coordinator.faulting import Faulting, Loss
from actors.coordinator.membership import Membership, WorkerSlot
from actors.coordinator.recovery import CheckpointState, Recovery
from actors.coordinator.reporting import Reporter
from actors.datasets import Dataset, evaluate
from actors.flat import load_flat
from actors.messages import BlockReady, GradientReply
from actors.modes.base import Applied, Mode, ModelOfRecord
from actors.modes.registry import analytic_bound
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
        evaluation: a model to load the model of record into, and the test set.
        parts: the collaborators: data plane, membership, faults, recovery, reporter.
    """

    def __init__(
        self,
        spec: JobSpec,
        mode: Mode,
        meter: Meter,
        norms: ObservedNorms,
        q: float,
        evaluation: tuple[torch.nn.Module, Dataset],
        parts: tuple[DataPlane, Membership, Faulting, Recovery, Reporter],
    ) -> None:
        self.spec = spec
        self.mode = mode
        self.record: ModelOfRecord = mode.model
        self.meter = meter
        self.norms = norms
        self.q = q
        self.net, self.ds = evaluation
        self.data, self.members, self.faults, self.recovery, self.reporter = parts
        self.inflight: dict[int, asyncio.Future[Outcome]] = {}
        self.lost_idle: list[Loss] = []  # workers whose serving loop ended between requests
        self.wake = asyncio.Event()  # set when lost_idle gets one (the loop acts at once)
        self.samples = 0
        self.refused = 0

    @property
    def monitor(self) -> ConsistencyMonitor:
        return self.meter.monitor

    def bound(self) -> float:
        return analytic_bound(self.spec, self.norms, self.q, self.meter.error_feedback)

    def bound_or_none(self) -> float | None:
        b = self.bound()
        return b if math.isfinite(b) else None

    def consistency(self) -> dict[str, Any]:
        """The summary's consistency section: B̂ against the bound, and the bound's norms."""
        cons = self.monitor.summary(self.bound())
        n = self.norms
        cons["norms"] = {
            "grad_max": n.grad_max,
            "raw_grad_max": n.raw_grad_max,
            "update_max": n.update_max,
            "update_block_sum_max": n.update_block_sum_max,
        }
        cons["compression_q"] = self.q
        return cons

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
        block, a same-host channel, no compression, and no fault plan that could still lose or
        hold back the message (a dropped or partitioned reply must take all its blocks)."""
        return (
            self.mode.streams_blocks
            and w.channel is not None
            and self.spec.compression.name == "none"
            and self.mode.local_steps() == 1
            and not any(f.spec.kind in ("drop", "partition") for f in self.faults.plan)
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
        if self.mode.on_block(w, msg.step, msg.block, msg.norm, self.data.shm.grad(wid)):
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
        """Start every worker the mode lets start."""
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
            w.t_dispatch = time.perf_counter()
            self.inflight[w.id] = self.data.send(w, req)

    def handle_reply(
        self, w: WorkerSlot, reply: GradientReply | None, exc: BaseException | None
    ) -> Loss | None:
        """One reply (or failure) from a worker, through the fault plan's network path.

        Returns:
            The worker to take out of the membership, if the reply says it is lost.
        """
        if w.partition_until is not None:
            w.partition_held = (reply, exc)  # the message waits out the partition
            return None
        if exc is not None or reply is None:
            # 200 characters: a Ray error's first line (its traceback stays in the logs)
            return Loss(w, f"worker lost: {type(exc).__name__}: {str(exc)[:200]}")
        self.data.release_view(w)
        grad = self.data.decode(w, reply)
        if self.faults.drop_due(w, reply, time.time() - self.reporter.t0):
            self._seen(w, reply, counted=False)
            if self.mode.on_lost(w, reply, grad):
                self.reporter.event(
                    EventKind.MISSING,
                    f"step {reply.step}: gradient missing, policy {self.spec.missing_policy}",
                    target=f"worker-{w.id}",
                    fault=FaultKind.DROP,
                )
        else:
            verdict = self.mode.on_reply(w, reply, grad)
            if verdict.unexpected:
                self.reporter.event(
                    EventKind.REFUSED,
                    f"unexpected gradient for step {reply.step} ignored",
                    target=f"worker-{w.id}",
                )
                return None
            self.refused += verdict.refused_stale
            self._seen(w, reply, counted=True)
        self.apply_ready()
        return None

    def _seen(self, w: WorkerSlot, reply: GradientReply, counted: bool) -> None:
        """Bookkeeping of a reply that arrived (``counted``: not lost on the way)."""
        self.reporter.timing.see(reply, time.perf_counter() - w.t_dispatch)
        w.sampler = reply.sampler_pos
        if not counted:
            return
        w.steps_done += 1
        self.samples += reply.n
        self.norms.see_grad(reply.sent_norm, reply.raw_norm)
        if reply.residual is not None:
            self.meter.residuals[w.id] = reply.residual

    def apply_ready(self) -> None:
        """Apply what became applicable; record, evaluate, checkpoint after each update."""
        for applied in self.mode.apply_ready():
            self._after_update(applied)

    def _after_update(self, applied: Applied) -> None:
        self.reporter.timing.see_apply(applied.apply_s)
        self.reporter.note_update()
        self.data.invalidate()
        if not applied.record:
            return
        self.reporter.step_record(
            loss=applied.loss,
            samples=self.samples,
            b_hat=self.meter.last,
            b_hat_max=self.monitor.b_max,
            bound=self.bound_or_none(),
            workers=len(self.members.live()),
            refused=self.refused,
        )
        step = self.mode.step
        if step % self.spec.eval_interval == 0 or step >= self.mode.total_steps:
            self.evaluate()
        if applied.consistent and self.recovery.checkpoint_due(step):
            self.checkpoint()

    # -- evaluation and checkpoints ------------------------------------------------------------
    def evaluate(self) -> None:
        """Test metrics of the model of record (recorded)."""
        ds = self.ds
        load_flat(self.net, self.record.x)
        metrics = evaluate(self.net, ds)
        if ds.optimum is not None:
            metrics["dist_to_optimum"] = float(
                (self.record.x - torch.from_numpy(ds.optimum)).norm()
            )
        self.reporter.eval_record(metrics, len(self.members.live()))

    def checkpoint(self) -> None:
        spec = self.spec
        samplers = {
            w.id: {
                **w.sampler,
                "seed": spec.seed,
                "shard_key": w.id,
                "shard": self.members.shards[w.id].tolist(),
            }
            for w in self.members.live()
            if w.sampler is not None
        }
        m = self.monitor
        path = self.recovery.write(
            CheckpointState(
                x=self.record.x.clone(),
                opt=self.record.opt.state_dict(),
                step=self.mode.step,
                version=self.record.version,
                samples=self.samples,
                workers=sorted(samplers),
                samplers=samplers,
                fired=sorted(self.faults.driver.fired),
                resizes=self.members.resizes,
                monitor=(m.b_max, m.count, m.total),
                norms=vars(self.norms).copy(),
                elapsed_s=time.time() - self.reporter.t0,
                residuals={k: v.copy() for k, v in self.meter.residuals.items()},
                torch_rng=torch.get_rng_state(),
                refused=self.refused,
                dropped=self.faults.dropped,
                t0=self.reporter.t0,
            )
        )
        self.reporter.event(EventKind.CHECKPOINT, f"step {self.mode.step} -> {path.name}")

    def restore(self, st: CheckpointState) -> None:
        """Continue from checkpoint ``st`` (the model, counters, monitor, fired faults)."""
        self.record.x.copy_(st.x)
        self.record.opt.load_state_dict(st.opt)
        self.record.version, self.samples = st.version, st.samples
        self.faults.driver.fired |= set(st.fired)
        self.members.resizes = st.resizes
        m = self.monitor
        m.b_max, m.count, m.total = st.monitor
        for k, v in st.norms.items():
            setattr(self.norms, k, v)
        self.meter.residuals = dict(st.residuals)
        self.refused, self.faults.dropped = st.refused, st.dropped
        torch.set_rng_state(st.torch_rng)
        self.mode.restore(st.step)
