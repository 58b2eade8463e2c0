"""The coordinator actor: model of record, scheduling rule, membership, consistency monitor.

One asyncio loop drives the job. Each live worker has at most one gradient request in
flight; when a reply arrives the coordinator folds the gradient in (a step's running sum in
the step modes, a whole update in async mode), applies every step that became complete,
and asks the mode's rule (:mod:`actors.scheduling`) which waiting workers may start their
next step, on which view. Views and gradients move over :mod:`actors.transport`.

The model of record ``x`` is always the consistent model of the steps completed so far.
Every view handed out is compared with the consistent model of the iteration it is used at
(:mod:`actors.consistency`), which gives B̂ live.

Control calls (``poll``, ``scale``, ``inject``, ``cancel``) are other coroutines on the same
loop; metrics and events wait in a buffer until a poll acknowledges them, so a restarted
poller loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import os
import platform
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from actors.channel import CoordinatorEnd, make_pair
from actors.checkpoint import Journal, latest_valid, write_checkpoint
from actors.compression import Payload, error_factor
from actors.consistency import ConsistencyMonitor, ObservedNorms, analytic_bound
from actors.datasets import Dataset, evaluate, load_dataset
from actors.fault_driver import FaultDriver
from actors.faults import ActiveFault, bind_plan
from actors.flat import ParamLayout, flatten, load_flat
from actors.models import build_model
from actors.optim import FlatSGD
from actors.sampler import make_shards
from actors.scheduling import AsyncRule, StepBook, make_async_rule, make_step_rule
from actors.transport import ShmPool, ShmRef, from_wire, host_id, sweep_stale, to_wire
from actors.worker import Worker
from core.errors import InvalidRequest, InvalidTransition
from core.events import (
    EvalRecord,
    Event,
    EventKind,
    FaultKind,
    Record,
    StepRecord,
    record_from_dict,
)
from core.spec import AsyncMode, FaultSpec, JobSpec
from core.state import JobState

NAMESPACE = "elastic-sgd"

log = logging.getLogger("elastic_sgd.coordinator")


@dataclass
class WorkerSlot:
    """The coordinator's record of one worker."""

    id: int
    actor: Any
    gen: int = 0  # incarnation: replies from an older incarnation are ignored
    state: str = "starting"  # starting | idle | busy | waiting | held | dead | left
    node: str = ""
    host: str = ""
    pid: int = 0
    shm: bool = False
    grad_ref: ShmRef | None = None
    view_slot: int | None = None
    view_vec: torch.Tensor | None = None  # the view, kept while its B̂ is pending
    view_version: int = 0  # async: model version of the view
    last_step: int | None = None
    own: torch.Tensor | None = None  # last gradient sent (elastic rule)
    own_norm: float = 0.0
    held: dict[str, Any] | None = None  # async wait mode: a reply held back
    steps_done: int = 0
    t_dispatch: float = 0.0
    sampler: dict[str, Any] | None = None  # sampler position after its last reply
    reshard: list[int] | None = None  # new shard, sent with the next request
    send_plan: bool = False  # the fault plan changed: send it with the next request
    partition_until: float | None = None  # replies are held back until then (t_s)
    partition_held: tuple[Any, Any] | None = None
    lost_at: float | None = None  # wall time its loss was detected
    t_partition: float = 0.0
    channel: CoordinatorEnd | None = None  # same-host pipe; None: Ray calls
    serve_task: asyncio.Future[Any] | None = None
    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "node": self.node,
            "host": self.host,
            "pid": self.pid,
            "step": self.last_step,
            "steps_done": self.steps_done,
            "transport": "shared_memory" if self.shm else "object_store",
        }


@dataclass
class Timing:
    """Where a step's time goes: worker compute, injected delay, the rest of the round trip."""

    n: int = 0
    compute_s: float = 0.0
    delay_s: float = 0.0
    roundtrip_s: float = 0.0
    apply_s: float = 0.0
    applies: int = 0

    def see(self, res: dict[str, Any], roundtrip_s: float) -> None:
        self.n += 1
        self.compute_s += float(res.get("compute_s", 0.0))
        self.delay_s += float(res.get("delay_s", 0.0))
        self.roundtrip_s += roundtrip_s

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {
            "compute_ms": 1e3 * self.compute_s / n,
            "delay_ms": 1e3 * self.delay_s / n,
            "roundtrip_ms": 1e3 * self.roundtrip_s / n,
            "overhead_ms": 1e3 * (self.roundtrip_s - self.compute_s - self.delay_s) / n,
            "apply_ms": 1e3 * self.apply_s / max(self.applies, 1),
        }


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


class CoordinatorCore:
    """The coordinator's logic; :class:`Coordinator` is the Ray actor around it.

    Args:
        job_id: the job's id (names actors and shared-memory files).
        spec: the job.
        data_dir: where ``npz`` datasets live.
    """

    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        data_dir: str | None = None,
        state_dir: str | None = None,
        resume: bool = False,
    ) -> None:
        self.job_id = job_id
        self.state_dir = Path(state_dir) if state_dir else None
        # continue from the latest checkpoint in state_dir (as after a crash of this actor)
        self.resume = resume
        self.spec = spec
        self.state = JobState.STARTING
        self.error: str | None = None
        self.t0 = time.time()
        self.t_run: float | None = None
        self.t_end: float | None = None
        torch.manual_seed(spec.seed)
        self.ds: Dataset = load_dataset(
            spec.dataset,
            spec.seed,
            None if data_dir is None else __import__("pathlib").Path(data_dir),
        )
        self.model = build_model(
            spec.model, self.ds.n_features, self.ds.n_outputs, self.ds.input_shape
        )
        self.layout = ParamLayout.of(self.model)
        self.x = flatten(self.model)
        self.opt = FlatSGD(spec.optimizer)
        self.total_steps = spec.total_steps(len(self.ds.x_train))
        self.is_async = isinstance(spec.mode, AsyncMode)
        self.book = StepBook(self.total_steps, jumps=False)
        self.async_rule: AsyncRule | None = None
        if isinstance(spec.mode, AsyncMode):
            self.async_rule = make_async_rule(spec.mode)
            self.step_rule = None
        else:
            self.step_rule = make_step_rule(spec.mode)
            self.book = StepBook(self.total_steps, jumps=self.step_rule.jumps)
        self.p0 = spec.workers
        self.total_updates = self.total_steps * self.p0 if self.is_async else self.total_steps
        self.version = 0  # updates applied to x
        self.samples = 0
        self.refused = 0
        self.step_sums: dict[int, torch.Tensor] = {}
        # sync: gradients stay where they arrived until the step is applied (no worker
        # overwrites its slot before that), so no running sum is needed
        self.lazy_sums = not self.is_async and not self.book.jumps
        self.step_grads: dict[int, list[torch.Tensor]] = {}
        self.x_ref: ShmRef | None = None
        self.step_losses: dict[int, list[float]] = {}
        self.pending_views: list[tuple[int, int, torch.Tensor]] = []  # (target, worker, view)
        self.residuals: dict[int, np.ndarray] = {}
        self.q, _ = error_factor(spec.compression, self.layout.numel)
        self.ef = spec.compression.name != "none" and spec.compression.error_feedback
        self.norms = ObservedNorms()
        self.timing = Timing()
        self.monitor = ConsistencyMonitor()
        self.views_handed = 0
        self.workers: dict[int, WorkerSlot] = {}
        self.inflight: dict[int, asyncio.Future[Any]] = {}
        self.plan: list[ActiveFault] = []
        self.records: list[Record] = []
        self.events: list[Event] = []  # not yet acknowledged by a poll
        self.event_log: list[Event] = []  # every event of the run
        self.seq = 0
        self.shm: ShmPool | None = None
        self.view_cache: OrderedDict[Any, Any] = OrderedDict()
        self.last_eval: dict[str, float] = {}
        self.last_b_hat = 0.0
        self.rate_window: list[tuple[float, int]] = []
        self.cancel_requested = False
        self._wake = asyncio.Event()
        self.data_refs: tuple[Any, Any] | None = None
        self.driver = FaultDriver(self.plan, spec.seed)
        self.shards: dict[int, np.ndarray] = {}
        self.resizes = 0
        self.pending_joins: list[tuple[float, int]] = []  # (wall time due, worker id)
        self.lost_grads: dict[int, list[torch.Tensor]] = {}
        self.dropped = 0
        self.recoveries: list[dict[str, Any]] = []
        self.last_ckpt_step = 0
        self.last_ckpt_t = time.time()
        self.restarts = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self.steps_lost = 0
        self.journal: Journal | None = None
        if self.state_dir is not None:
            self.journal = Journal(self.state_dir / "journal.jsonl")

    # -- records and events ------------------------------------------------------------
    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def event(
        self,
        kind: EventKind,
        detail: str,
        target: str | None = None,
        step: int | None = None,
        fault: FaultKind | None = None,
    ) -> None:
        now = time.time()
        ev = Event(
            seq=self._next_seq(),
            wall_time=now,
            time_s=now - self.t0,
            step=self.step if step is None else step,
            kind=kind,
            detail=detail,
            target=target,
            fault=fault,
        )
        self.events.append(ev)
        self.event_log.append(ev)
        if self.journal is not None:
            self.journal.append(ev.to_dict())
        log.info("%s %s %s", kind, target or "", detail)

    def _set_state(self, state: JobState, why: str) -> None:
        if state == self.state:
            return
        old = self.state
        self.state = state
        self.event(EventKind.STATE, f"{old.value} -> {state.value}: {why}")
        self._wake.set()

    @property
    def step(self) -> int:
        return self.version // self.p0 if self.is_async else self.book.completed

    def _add_record(self, rec: Record) -> None:
        self.records.append(rec)
        if self.journal is not None:
            self.journal.append(rec.to_dict())

    def _record_step(self, loss: float) -> None:
        now = time.time()
        self.rate_window.append((now, self.samples))
        self.rate_window = self.rate_window[-50:]
        t_a, s_a = self.rate_window[0]
        rate = (self.samples - s_a) / (now - t_a) if now > t_a else 0.0
        self._add_record(
            StepRecord(
                seq=self._next_seq(),
                step=self.step,
                time_s=now - self.t0,
                wall_time=now,
                loss=None if math.isnan(loss) else loss,
                samples_per_s=rate,
                samples=self.samples,
                b_hat=self.last_b_hat,
                b_hat_max=self.monitor.b_max,
                bound=self._bound_or_none(),
                workers=len(self._live()),
                refused=self.refused,
            )
        )

    def _bound(self) -> float:
        return analytic_bound(self.spec, self.norms, self.q, self.ef)

    def _bound_or_none(self) -> float | None:
        b = self._bound()
        return b if math.isfinite(b) else None

    def _evaluate(self) -> dict[str, float]:
        load_flat(self.model, self.x)
        metrics = evaluate(self.model, self.ds)
        self.last_eval = metrics
        now = time.time()
        values: dict[str, float | None] = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
        }
        if self.ds.optimum is not None:
            dist = float((self.x - torch.from_numpy(self.ds.optimum)).norm())
            values["dist_to_optimum"] = dist
            metrics["dist_to_optimum"] = dist
        self._add_record(
            EvalRecord(
                seq=self._next_seq(),
                step=self.step,
                time_s=now - self.t0,
                wall_time=now,
                workers=len(self._live()),
                metrics=values,
            )
        )
        return metrics

    # -- membership ----------------------------------------------------------------------
    def _live(self) -> list[WorkerSlot]:
        return [w for w in self.workers.values() if w.state not in ("dead", "left")]

    async def start(self) -> dict[str, Any]:
        """Create the workers (the job's initial membership)."""
        sweep_stale(self.job_id)
        self.data_refs = (ray.put(self.ds.x_train), ray.put(self.ds.y_train))
        if self.spec.transport != "object_store":
            self.shm = ShmPool(self.job_id, self.layout.numel)
            if self.lazy_sums:
                self.x, self.x_ref = self.shm.model_slot(self.x)
        ids = list(range(self.spec.workers))
        self.plan[:] = bind_plan(self.spec.faults, ids, self.spec.seed)
        samplers: dict[int, dict[str, Any]] = {}
        if (self.resume or self._reconstructed()) and self.state_dir is not None:
            ids, samplers = self._resume()
        shards = make_shards(len(self.ds.x_train), len(ids), self.spec.seed + self.resizes)
        for i, wid in enumerate(ids):
            self.shards[wid] = shards[i]
        members: dict[int, int] = {}
        if samplers and self.state_dir is not None and (self.state_dir / "members.json").exists():
            members = {
                int(k): int(v)
                for k, v in json.loads((self.state_dir / "members.json").read_text()).items()
            }

        async def bring(wid: int) -> None:
            if wid in members and await self._reattach(wid, members[wid], samplers.get(wid)):
                return
            await self._add_worker(wid, self.shards[wid], samplers.get(wid))

        await asyncio.gather(*(bring(w) for w in ids))
        live = self._live()
        if len(live) < self.spec.min_workers:
            self._set_state(
                JobState.FAILED,
                f"only {len(live)} workers started; min_workers={self.spec.min_workers}",
            )
        return {
            "workers": [w.public() for w in live],
            "total_steps": self.total_steps,
            "parameters": self.layout.numel,
        }

    def _worker_options(self) -> dict[str, Any]:
        r = self.spec.resources
        gpus: float = 0.0
        if r.worker_gpus == "auto":
            total = ray.cluster_resources().get("GPU", 0.0)
            if total > 0:
                gpus = min(1.0, total / max(self.spec.workers, 1))
        else:
            gpus = float(r.worker_gpus)
        return {"num_cpus": r.worker_cpus, "num_gpus": gpus, "scheduling_strategy": "SPREAD"}

    def _worker_name(self, wid: int, gen: int) -> str:
        return f"esgd-{self.job_id}-w{wid}-g{gen}"

    def _save_members(self) -> None:
        """Which worker incarnations are live: a restarted coordinator re-attaches to them."""
        if self.state_dir is None:
            return
        members = {w.id: w.gen for w in self._live() if w.state != "starting"}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / ".members.json.tmp"
        tmp.write_text(json.dumps(members))
        os.replace(tmp, self.state_dir / "members.json")

    async def _reattach(self, wid: int, gen: int, sampler_state: dict[str, Any] | None) -> bool:
        """Adopt a worker that outlived the previous coordinator incarnation."""
        try:
            actor = ray.get_actor(self._worker_name(wid, gen), namespace=NAMESPACE)
            await asyncio.wait_for(actor.ping.remote(), timeout=5.0)
            if sampler_state is not None:
                await actor.reset_sampler.remote(sampler_state)
        except Exception:  # noqa: BLE001 - gone or unreachable: start a new one instead
            return False
        slot = WorkerSlot(id=wid, actor=actor, shard=self.shards[wid], gen=gen)
        self.workers[wid] = slot
        return await self._attach(slot, reattached=True)

    async def _add_worker(
        self, wid: int, shard: np.ndarray, sampler_state: dict[str, Any] | None = None
    ) -> WorkerSlot | None:
        assert self.data_refs is not None
        old = self.workers.get(wid)
        gen = old.gen + 1 if old is not None else 0
        opts = self._worker_options()
        # detached and named: the worker outlives a coordinator crash and is re-attached
        opts.update(lifetime="detached", name=self._worker_name(wid, gen), namespace=NAMESPACE)
        actor = Worker.options(**opts).remote(  # type: ignore[attr-defined]
            wid,
            self.spec,
            self.data_refs[0],
            self.data_refs[1],
            self.ds.task,
            self.ds.n_features,
            self.ds.n_outputs,
            self.ds.input_shape,
            shard,
            sampler_state,
            self.plan,
            self.t0,
            None,
        )
        slot = WorkerSlot(id=wid, actor=actor, shard=shard, gen=gen)
        self.shards[wid] = shard
        self.workers[wid] = slot
        return slot if await self._attach(slot) else None

    async def _attach(self, slot: WorkerSlot, reattached: bool = False) -> bool:
        """Learn where a worker runs, pick its transport, and add it to the membership."""
        wid, actor = slot.id, slot.actor
        grad_ref = self.shm.grad_slot(wid) if self.shm is not None else None
        try:
            info = await actor.info.remote()
            shm_ok = False
            if self.shm is not None:
                shm_ok = await actor.shm_ok.remote(self.shm.probe_path())
                if not shm_ok and self.spec.transport == "shared_memory":
                    raise RuntimeError(
                        "transport=shared_memory but the worker is on another "
                        "host; use transport=auto or object_store"
                    )
        except Exception as exc:  # noqa: BLE001 - any failure to start is a lost worker
            slot.state = "dead"
            self.event(
                EventKind.MEMBERSHIP, f"worker failed to start: {exc}", target=f"worker-{wid}"
            )
            return False
        slot.node, slot.host, slot.pid = info["node"], info["host"], info["pid"]
        slot.shm = shm_ok
        slot.grad_ref = grad_ref if shm_ok else None
        if shm_ok:
            self._open_channel(slot)
        slot.state = "idle"
        if not self.is_async:
            self.book.join(wid)
        self.event(
            EventKind.MEMBERSHIP,
            f"worker {'re-attached' if reattached else 'joined'} (node {slot.node[:8]}, "
            f"pid {slot.pid}, {'shared memory' if shm_ok else 'object store'})",
            target=f"worker-{wid}",
        )
        self._save_members()
        return True

    def _open_channel(self, w: WorkerSlot) -> None:
        """Requests and replies over a FIFO pair; Ray's call watches for the worker's death."""
        assert self.shm is not None
        req, rep = make_pair(str(self.shm.dir), w.id)
        gen = w.gen
        w.channel = CoordinatorEnd(req, rep, lambda msg: self._on_pipe_reply(w.id, gen, msg))
        ref = w.actor.serve_pipe.remote(req, rep)
        w.serve_task = asyncio.ensure_future(self._watch(w.id, gen, ref))

    async def _watch(self, wid: int, gen: int, ref: Any) -> None:
        try:
            await ref
            exc: BaseException | None = None
        except Exception as e:  # noqa: BLE001 - the worker died: data, not a crash
            exc = e
        w = self.workers.get(wid)
        if w is None or w.gen != gen or w.state in ("dead", "left"):
            return
        fut = self.inflight.get(wid)
        err = exc or RuntimeError("the worker's serving loop ended")
        if fut is not None and not fut.done():
            fut.set_result((wid, gen, None, err))
        else:
            self._lose_worker(w, f"worker lost while idle: {type(err).__name__}")
            self._wake.set()

    def _on_pipe_reply(self, wid: int, gen: int, msg: Any) -> None:
        fut = self.inflight.get(wid)
        if fut is not None and not fut.done():
            fut.set_result((wid, gen, msg, None))

    def _close_channel(self, w: WorkerSlot) -> None:
        if w.channel is not None:
            with contextlib.suppress(OSError):
                w.channel.send(None)
            w.channel.close()
            w.channel = None

    def _lose_worker(self, w: WorkerSlot, why: str, keep_actor: bool = False) -> None:
        """Take a worker out of the membership; start a replacement unless told otherwise."""
        if w.state in ("dead", "left"):
            return
        w.state = "dead"
        w.lost_at = time.time()
        if not any(r["worker"] == w.id and "t_detected" not in r for r in self.recoveries):
            # not a planned crash (killed from outside, node lost, hung): time from detection
            self.recoveries.append({"kind": "lost", "worker": w.id, "t_fault": w.lost_at})
        for r in self.recoveries:
            if r["worker"] == w.id and "t_detected" not in r:
                r["t_detected"] = w.lost_at
        self.inflight.pop(w.id, None)
        self._close_channel(w)
        self._release_view(w)
        if not self.is_async:
            left = self.book.leave(w.id)
            why += f"; left steps {left}" if left else ""
        self.event(EventKind.DETECT, why, target=f"worker-{w.id}")
        self._save_members()
        rejoining = any(wid == w.id for _, wid in self.pending_joins)
        if not keep_actor and not rejoining and self.spec.replace_lost_workers:
            self.pending_joins.append((time.time(), w.id))
        self._membership_changed()
        live = [o for o in self._live() if o.state != "starting"]
        if len(live) < self.spec.min_workers:
            self._set_state(
                JobState.FAILED, f"{len(live)} live workers < min_workers={self.spec.min_workers}"
            )

    # -- views -------------------------------------------------------------------------------
    def _publish(self, w: WorkerSlot, key: Any, vec: torch.Tensor) -> ShmRef | Any:
        """Hand ``vec`` to ``w`` over its transport; identical views share one copy."""
        if w.shm and self.x_ref is not None and key[0] == "x":
            w.view_slot = None
            return self.x_ref
        if w.shm:
            assert self.shm is not None
            cached = self.view_cache.get(("shm", key))
            if cached is not None:
                slot, ref = cached
                self.shm.retain(slot)
            else:
                slot, ref = self.shm.publish(vec, readers=1)
                self._cache_put(("shm", key), (slot, ref))
                self.shm.retain(slot)  # the cache holds one reference
            w.view_slot = slot
            return ref
        cached = self.view_cache.get(("obj", key))
        if cached is None:
            cached = ray.put(to_wire(vec, self.spec.transfer_dtype))
            self._cache_put(("obj", key), cached)
        return cached

    def _cache_put(self, key: Any, value: Any) -> None:
        self.view_cache[key] = value
        while len(self.view_cache) > 8:
            old_key, old = self.view_cache.popitem(last=False)
            if old_key[0] == "shm" and self.shm is not None:
                self.shm.release(old[0])

    def _release_view(self, w: WorkerSlot) -> None:
        if w.view_slot is not None and self.shm is not None:
            self.shm.release(w.view_slot)
        w.view_slot = None

    def _mean_residual(self) -> torch.Tensor | None:
        if not self.ef or not self.residuals:
            return None
        acc = np.zeros(self.layout.numel, dtype=np.float64)
        for r in self.residuals.values():
            acc += r
        return torch.from_numpy((acc / max(len(self._live()), 1)).astype(np.float32))

    def _measure(self, diff_over_lr: torch.Tensor | None) -> None:
        """Record one B̂ sample: ``||(x - v)/lr - mean(e)||`` (``None`` diff: ``v == x``)."""
        res = self._mean_residual()
        if diff_over_lr is None and res is None:
            b = 0.0
        elif diff_over_lr is None:
            assert res is not None
            b = float(res.norm())
        else:
            b = (
                float((diff_over_lr - res).norm())
                if res is not None
                else float(diff_over_lr.norm())
            )
        self.last_b_hat = b
        self.monitor.record(self.step, b)

    def _sample_view(self) -> bool:
        self.views_handed += 1
        return (self.views_handed - 1) % self.spec.monitor_interval == 0

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch(self, w: WorkerSlot, step: int, key: Any, vec: torch.Tensor) -> None:
        view = self._publish(w, key, vec)
        want_res = self.ef and (w.steps_done % self.spec.monitor_interval == 0)
        w.t_dispatch = time.perf_counter()
        w.state = "busy"
        gen = w.gen
        extra: dict[str, Any] = {}
        if w.reshard is not None:
            extra["reshard"], w.reshard = w.reshard, None
        if w.send_plan:
            extra["faults"], w.send_plan = list(self.plan), False
        if w.channel is not None:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.inflight[w.id] = fut
            w.channel.send(
                {
                    "step": step,
                    "view": view,
                    "want_residual": want_res,
                    "set_grad_slot": w.grad_ref,
                    **extra,
                }
            )
            return
        ref = w.actor.compute.remote(step, view, want_res, w.grad_ref, **extra)
        self.inflight[w.id] = asyncio.ensure_future(self._await_reply(w.id, gen, ref))

    async def _await_reply(self, wid: int, gen: int, ref: Any) -> tuple[int, int, Any, Any]:
        try:
            return wid, gen, await ref, None
        except Exception as exc:  # noqa: BLE001 - a dead worker is data, not a crash
            return wid, gen, None, exc

    def _grad_of(self, w: WorkerSlot, res: dict[str, Any]) -> torch.Tensor:
        if "payload" in res:
            payload: Payload = res["payload"]
            return torch.from_numpy(payload.decode())
        if isinstance(res["grad"], str):  # "shm": in the worker's slot
            assert self.shm is not None
            return self.shm.grad(w.id)
        return from_wire(res["grad"], self.spec.transfer_dtype)

    def _handle_reply(self, w: WorkerSlot, res: Any, exc: Any) -> None:
        """One reply (or failure) from a worker, through the fault plan's network path."""
        if w.partition_until is not None:
            w.partition_held = (res, exc)  # the message waits out the partition
            return
        if exc is not None:
            self._lose_worker(w, f"worker lost: {type(exc).__name__}: {str(exc)[:200]}")
            return
        step = int(res["step"])
        f = self.driver.drop_due(w.id, step, self._t_s())
        if f is not None:
            self._drop(w, res)
            return
        if self.is_async:
            self._on_async_reply(w, res)
        else:
            self._on_step_reply(w, res)

    def _drop(self, w: WorkerSlot, res: dict[str, Any]) -> None:
        """The gradient message is lost on the way; the sequence gap is noticed at once."""
        step = int(res["step"])
        self.dropped += 1
        self.event(
            EventKind.FAULT,
            f"gradient of step {step} dropped",
            target=f"worker-{w.id}",
            fault=FaultKind.DROP,
        )
        self.timing.see(res, time.perf_counter() - w.t_dispatch)
        w.sampler = res.get("sampler")
        self._release_view(w)
        if self.is_async:
            w.view_vec, w.state = None, "idle"
            return
        g = self._grad_of(w, res)
        self.lost_grads.setdefault(step, []).append(g.clone())
        self.book.lose(w.id, step)
        w.state, w.last_step, w.own, w.own_norm = "waiting", step, None, 0.0
        self.event(
            EventKind.MISSING,
            f"step {step}: gradient missing, policy {self.spec.missing_policy}",
            target=f"worker-{w.id}",
            fault=FaultKind.DROP,
        )
        self._complete_steps()

    # -- step modes (sync, elastic) ----------------------------------------------------------
    def _on_step_reply(self, w: WorkerSlot, res: dict[str, Any]) -> None:
        step = int(res["step"])
        self._release_view(w)
        w.state = "waiting"
        if not self.book.arrive(w.id, step):
            self.event(
                EventKind.REFUSED,
                f"unexpected gradient for step {step} ignored",
                target=f"worker-{w.id}",
            )
            return
        g = self._grad_of(w, res)
        if self.lazy_sums:
            self.step_grads.setdefault(step, []).append(g)
        elif (s := self.step_sums.get(step)) is None:
            self.step_sums[step] = g.clone()
        else:
            s.add_(g)
        self.step_losses.setdefault(step, []).append(float(res["loss"]))
        w.last_step, w.own, w.own_norm = step, g, float(res["sent_norm"])
        self._after_reply(w, res)
        self._complete_steps()

    def _after_reply(self, w: WorkerSlot, res: dict[str, Any]) -> None:
        self.timing.see(res, time.perf_counter() - w.t_dispatch)
        w.sampler = res.get("sampler")
        w.steps_done += 1
        self.samples += int(res["n"])
        self.norms.see_grad(float(res["sent_norm"]), float(res["raw_norm"]))
        if "residual" in res:
            self.residuals[w.id] = res["residual"]

    def _complete_steps(self) -> None:
        while (entry := self.book.completable()) is not None:
            step = entry.step
            s = self.step_sums.pop(step, None)
            grads = self.step_grads.pop(step, [])
            losses = self.step_losses.pop(step, [])
            n_arrived = len(entry.arrived)
            # skip: the lost share is left out; substitute: stand in the received mean
            n = n_arrived + (len(entry.lost) if self.spec.missing_policy == "skip" else 0)
            if entry.lost:
                self._record_lost(step, n_arrived, max(n, 1), grads if s is None else [s])
            if n_arrived > 0 and (s is not None or grads):
                t_apply = time.perf_counter()
                if s is not None:
                    self.opt.step(self.x, s, scale=1.0 / n)
                else:
                    self.opt.step_many(self.x, grads, scale=1.0 / n)
                self.timing.apply_s += time.perf_counter() - t_apply
                self.timing.applies += 1
            self.book.complete(step)
            self.version += 1
            self._note_update()
            self._measure_pending()
            self._record_step(float(np.mean(losses)) if losses else math.nan)
            self._maybe_eval()
            self.view_cache_invalidate()
            if self._checkpoint_due():
                self._checkpoint()

    def _note_update(self) -> None:
        """Recovery timing: the first update applied after a lost worker was detected."""
        now = time.time()
        for r in self.recoveries:
            if "t_detected" in r and "t_next_update" not in r:
                r["t_next_update"] = now

    def view_cache_invalidate(self) -> None:
        for key in list(self.view_cache):
            old = self.view_cache.pop(key)
            if key[0] == "shm" and self.shm is not None:
                self.shm.release(old[0])

    def _measure_pending(self) -> None:
        keep = []
        for target, wid, v in self.pending_views:
            if target <= self.book.completed:
                self._measure((self.x - v) / self.opt.lr)
            else:
                keep.append((target, wid, v))
        self.pending_views = keep

    def _maybe_eval(self) -> None:
        if self.step % self.spec.eval_interval == 0 or self.step >= self.total_steps:
            self._evaluate()

    def _step_view(self, target: int) -> tuple[Any, torch.Tensor, bool]:
        """The view for ``target``: ``x`` plus provisional partial steps (elastic)."""
        c = self.book.completed
        if target <= c:
            return ("x", self.version), self.x, True
        v, buf = self.x, self.opt.buf
        parts = []
        for j in range(c, target):
            entry = self.book.open.get(j)
            s = self.step_sums.get(j)
            n = len(entry.assigned) if entry is not None else 1
            parts.append((j, len(entry.arrived) if entry else 0, n))
            g = s if s is not None else torch.zeros_like(self.x)
            v, buf = self.opt.peek(v, g, buf, scale=1.0 / max(n, 1))
        return ("p", self.version, tuple(parts)), v, False

    def _schedule_steps(self) -> None:
        assert self.step_rule is not None
        for w in sorted(self._live(), key=lambda w: w.id):
            if w.state not in ("idle", "waiting") or self.book.finished():
                continue
            target = self.book.next_step(w.id)
            if target >= self.total_steps:
                continue
            last = w.last_step
            last_complete = last is None or last < self.book.completed
            received = None
            if not last_complete and last is not None and self.book.jumps:
                s = self.step_sums.get(last)
                received = float((s - w.own).norm()) if s is not None and w.own is not None else 0.0
            d = self.step_rule.may_start(
                target,
                self.book.oldest_incomplete,
                None if last_complete else w.own_norm,
                received,
                last_complete,
            )
            if not d.allowed:
                continue
            key, vec, exact = self._step_view(target)
            if self._sample_view():
                if exact:
                    self._measure(None)
                else:
                    self.pending_views.append((target, w.id, vec.clone()))
            self.book.assign(w.id, target)
            w.own = None
            self._dispatch(w, target, key, vec)

    # -- async mode -------------------------------------------------------------------------
    def _on_async_reply(self, w: WorkerSlot, res: dict[str, Any]) -> None:
        assert self.async_rule is not None
        if self.async_rule.verdict(self.version, w.view_version) == "refuse":
            self.refused += 1
            self._after_reply(w, res)
            self._release_view(w)
            w.view_vec = None
            w.state = "idle"
            return
        w.held = res
        w.state = "held"
        self._apply_held()

    def _apply_held(self) -> None:
        assert self.async_rule is not None
        progress = True
        while progress:
            progress = False
            held = sorted(
                (w for w in self._live() if w.state == "held"), key=lambda w: w.view_version
            )
            for w in held:
                others = [
                    o.view_version
                    for o in self._live()
                    if o.id != w.id and o.state in ("busy", "held")
                ]
                if not self.async_rule.may_apply(self.version, w.view_version, others).allowed:
                    continue
                assert w.held is not None
                self._apply_async(w, w.held)
                progress = True

    def _apply_async(self, w: WorkerSlot, res: dict[str, Any]) -> None:
        g = self._grad_of(w, res)
        if w.view_vec is not None:
            self._measure((self.x - w.view_vec) / self.opt.lr)
        d = self.opt.step(self.x, g)
        self.norms.see_update(float(d.norm()))
        self.version += 1
        self._after_reply(w, res)
        self._release_view(w)
        w.view_vec, w.held, w.state = None, None, "idle"
        self._note_update()
        if self.version % self.p0 == 0:
            self._record_step(float(res["loss"]))
            self._maybe_eval()
            if self._checkpoint_due():
                self._checkpoint()

    def _schedule_async(self) -> None:
        for w in sorted(self._live(), key=lambda w: w.id):
            if w.state != "idle":
                continue
            out = [o.view_version for o in self._live() if o.state in ("busy", "held")]
            if self.version + len(out) >= self.total_updates:
                return
            assert self.async_rule is not None
            if not self.async_rule.may_dispatch(self.version, out).allowed:
                return
            vec = self.x
            w.view_version = self.version
            sample = self._sample_view()
            if sample:
                w.view_vec = self.x.clone()
            self._dispatch(w, self.step, ("x", self.version), vec)

    # -- checkpoints and restart ---------------------------------------------------------------
    def _reconstructed(self) -> bool:
        """True when Ray restarted this actor after its process died."""
        try:
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:  # noqa: BLE001 - outside an actor
            return False

    @property
    def ckpt_dir(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "checkpoints"

    def _checkpoint_due(self) -> bool:
        c = self.spec.checkpoint
        if self.ckpt_dir is None or (c.interval_steps is None and c.interval_s is None):
            return False
        if c.interval_steps is not None and self.step - self.last_ckpt_step >= c.interval_steps:
            return True
        return c.interval_s is not None and time.time() - self.last_ckpt_t >= c.interval_s

    def _checkpoint(self) -> None:
        assert self.ckpt_dir is not None
        samplers = {}
        for w in self._live():
            if w.sampler is not None:
                samplers[w.id] = {
                    **w.sampler,
                    "seed": self.spec.seed,
                    "shard_key": w.id,
                    "shard": self.shards[w.id].tolist(),
                }
        state = {
            "x": self.x.clone(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "version": self.version,
            "samples": self.samples,
            "workers": sorted(samplers),
            "samplers": samplers,
            "fired": sorted(self.driver.fired),
            "resizes": self.resizes,
            "monitor": (self.monitor.b_max, self.monitor.count, self.monitor.total),
            "norms": vars(self.norms).copy(),
            "elapsed_s": time.time() - self.t0,
            "residuals": {k: v.copy() for k, v in self.residuals.items()},
            "torch_rng": torch.get_rng_state(),
            "refused": self.refused,
            "dropped": self.dropped,
            "t0": self.t0,
        }
        path = write_checkpoint(self.ckpt_dir, self.step, state, self.spec.checkpoint.keep)
        self.last_ckpt_step, self.last_ckpt_t = self.step, time.time()
        self.event(EventKind.CHECKPOINT, f"step {self.step} -> {path.name}")

    def _resume(self) -> tuple[list[int], dict[int, dict[str, Any]]]:
        """Restore the latest valid checkpoint and the journal; returns workers to start."""
        assert self.state_dir is not None and self.ckpt_dir is not None
        entries = Journal.read(self.state_dir / "journal.jsonl")
        if entries:  # keep the job's clock: time_s continues across the restart
            self.t0 = float(entries[0]["wall_time"]) - float(entries[0]["time_s"])
            self.t_run = self.t0
        for e in entries:
            self.seq = max(self.seq, int(e["seq"]))
            if "detail" in e:
                ev = Event.from_dict(e)
                self.events.append(ev)
                self.event_log.append(ev)
            else:
                self.records.append(record_from_dict(e))
        crash_step = max(
            (
                e.step
                for e in self.event_log
                if e.kind is EventKind.FAULT and e.fault is FaultKind.COORDINATOR_CRASH
            ),
            default=None,
        )
        if crash_step is None:  # not an injected crash: the last step the journal recorded
            crash_step = max((r.step for r in self.records), default=None)
        self.restarts = 1 + sum(1 for e in self.event_log if e.kind is EventKind.RESTART)
        fired_file = self.state_dir / "fired.json"
        if fired_file.exists():
            self.driver.fired |= set(json.loads(fired_file.read_text()))
        loaded = latest_valid(self.ckpt_dir)
        for why in loaded.skipped if loaded else []:
            self.event(EventKind.CHECKPOINT, f"skipped invalid checkpoint {why}")
        if loaded is None:
            self.event(EventKind.RESTART, "coordinator restarted; no valid checkpoint: from step 0")
            return list(range(self.spec.workers)), {}
        st = loaded.state
        self.x.copy_(st["x"])
        self.opt.load_state_dict(st["opt"])
        self.version, self.samples = int(st["version"]), int(st["samples"])
        self.driver.fired |= set(st["fired"])
        self.resizes = int(st["resizes"])
        self.monitor.b_max, self.monitor.count, self.monitor.total = st["monitor"]
        for k, v in st["norms"].items():
            setattr(self.norms, k, v)
        self.residuals = dict(st["residuals"])
        self.refused, self.dropped = int(st["refused"]), int(st["dropped"])
        torch.set_rng_state(st["torch_rng"])
        if not self.is_async:
            self.book = StepBook(self.total_steps, jumps=self.book.jumps, start_step=st["step"])
        self.last_ckpt_step = int(st["step"])
        lost = (crash_step - int(st["step"])) if crash_step is not None else 0
        self.steps_lost += max(lost, 0)
        self.event(
            EventKind.RESTART,
            f"coordinator restarted from {loaded.path.name} (step "
            f"{st['step']}); {max(lost, 0)} steps lost since the checkpoint",
            target="coordinator",
        )
        ids = list(st["workers"]) or list(range(self.spec.workers))
        return ids, {int(k): v for k, v in st["samplers"].items()}

    # -- faults, heartbeats, membership ----------------------------------------------------------
    def _t_s(self) -> float:
        return time.time() - self.t0

    def _kill_process(self, w: WorkerSlot) -> None:
        """Kill a worker's process for real: SIGKILL on this host, Ray's kill elsewhere."""
        if w.host == host_id() and w.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGKILL)
        else:
            with contextlib.suppress(Exception):
                ray.kill(w.actor, no_restart=True)

    def _tick(self) -> None:
        """Fire due faults, watch heartbeats, bring back workers; once per loop turn."""
        t_s, now = self._t_s(), time.time()
        if self.driver.coordinator_crash_due(self.step) is not None:
            self.event(
                EventKind.FAULT,
                f"coordinator crash injected at step {self.step}",
                target="coordinator",
                fault=FaultKind.COORDINATOR_CRASH,
            )
            if self.state_dir is not None:
                # the restarted coordinator must not fire this one-shot fault again
                (self.state_dir / "fired.json").write_text(json.dumps(sorted(self.driver.fired)))
            if self.journal is not None:
                self.journal.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        live_ids = [w.id for w in self._live() if w.state != "starting"]
        for f, wid in self.driver.crashes_due(self.step, t_s, live_ids):
            w = self.workers[wid]
            self.event(
                EventKind.FAULT,
                f"crash injected: SIGKILL pid {w.pid}",
                target=f"worker-{wid}",
                fault=FaultKind.CRASH,
            )
            w.lost_at = None
            self._kill_process(w)
            self.recoveries.append({"kind": "crash", "worker": wid, "t_fault": now})
            if f.spec.rejoin_after_s is not None:
                self.pending_joins.append((now + f.spec.rejoin_after_s, wid))
        for f, wid in self.driver.delays_started(self.step, t_s, live_ids):
            self.event(
                EventKind.FAULT,
                f"straggler delay on: {f.spec.distribution}, mean {f.spec.delay_ms:g} ms",
                target=f"worker-{wid}",
                fault=FaultKind.DELAY,
            )
        for w in self._live():
            if w.state == "starting":
                continue
            p = self.driver.partition_active(w.id, self.step, t_s)
            if p is not None and w.partition_until is None:
                w.partition_until = math.inf
                w.t_partition = now
                self.event(
                    EventKind.FAULT,
                    "partition: worker cut off from the coordinator",
                    target=f"worker-{w.id}",
                    fault=FaultKind.PARTITION,
                )
            elif p is None and w.partition_until is not None:
                self._heal(w)
            if (
                w.partition_until is not None
                and now - w.t_partition > self.spec.heartbeat_timeout_s
            ):
                self._lose_worker(
                    w,
                    f"no heartbeat for {self.spec.heartbeat_timeout_s:g} s (partitioned)",
                    keep_actor=True,
                )
                w.partition_until = math.inf
            elif (
                w.state == "busy"
                and w.partition_until is None
                and time.perf_counter() - w.t_dispatch > self._reply_deadline_s()
            ):
                self._lose_worker(w, f"no reply for {self._reply_deadline_s():.1f} s")
                self._kill_process(w)
        # partitioned workers declared lost come back when their window ends
        for w in list(self.workers.values()):
            if (
                w.state == "dead"
                and w.partition_until is not None
                and self.driver.partition_active(w.id, self.step, t_s) is None
            ):
                self.event(
                    EventKind.HEAL,
                    "partition healed: worker reachable again",
                    target=f"worker-{w.id}",
                    fault=FaultKind.PARTITION,
                )
                w.partition_until = None
                self._close_channel(w)
                self._kill_process(w)
                self.pending_joins.append((now, w.id))
        for i, a in enumerate(self.spec.scale_plan):
            key = f"scale:{i}"
            if key not in self.driver.fired and self.step >= a.at_step:
                self.driver.fired.add(key)
                self._tasks.add(asyncio.ensure_future(self.scale(a.workers)))
        due = [(t, wid) for t, wid in self.pending_joins if t <= now]
        self.pending_joins = [(t, wid) for t, wid in self.pending_joins if t > now]
        for _, wid in due:
            self._start_join(wid)

    def _membership_changed(self) -> None:
        """A worker left: steps (or held async updates) may have become applicable."""
        if self.state.terminal:
            return
        if self.is_async:
            self._apply_held()
        else:
            self._complete_steps()
        self._wake.set()

    def _reply_deadline_s(self) -> float:
        """How long a busy worker may stay silent before it counts as lost."""
        mean_rt = self.timing.roundtrip_s / max(self.timing.n, 1)
        return max(self.spec.heartbeat_timeout_s, 20.0 * mean_rt)

    def _heal(self, w: WorkerSlot) -> None:
        """A partition shorter than the heartbeat timeout ends: deliver what was held."""
        w.partition_until = None
        self.event(
            EventKind.HEAL,
            "partition healed: held replies delivered",
            target=f"worker-{w.id}",
            fault=FaultKind.PARTITION,
        )
        if w.partition_held is not None:
            res, exc = w.partition_held
            w.partition_held = None
            self._handle_reply(w, res, exc)

    def _start_join(self, wid: int) -> None:
        """(Re)start worker ``wid`` in the background with its shard."""
        if self.state.terminal or self.cancel_requested or self._finished():
            return
        old = self.workers.get(wid)
        if old is not None and old.state not in ("dead", "left"):
            return
        placeholder = WorkerSlot(
            id=wid, actor=None, state="starting", gen=(old.gen + 1) if old else 0
        )
        self.workers[wid] = placeholder
        shard = self.shards.get(wid)
        if shard is None:
            shard = make_shards(len(self.ds.x_train), 1, self.spec.seed)[0]
        sampler = None
        if old is not None and old.sampler is not None:
            sampler = {
                **old.sampler,
                "seed": self.spec.seed,
                "shard_key": wid,
                "shard": shard.tolist(),
            }
        self.event(
            EventKind.MEMBERSHIP,
            "starting a worker" + (" (rejoin)" if old else ""),
            target=f"worker-{wid}",
        )

        async def join() -> None:
            slot = await self._add_worker(wid, shard, sampler)
            if slot is not None:
                for r in self.recoveries:
                    if r["worker"] == wid and "t_rejoined" not in r:
                        r["t_rejoined"] = time.time()
            self._wake.set()

        task = asyncio.ensure_future(join())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def scale(self, n: int) -> dict[str, Any]:
        """Grow or shrink the job to ``n`` workers while it runs; data is re-sharded.

        Raises:
            InvalidRequest: ``n`` is outside ``[min_workers, max_workers]``.
            InvalidTransition: the job has ended.
        """
        hi = self.spec.max_workers_or_workers
        if not self.spec.min_workers <= n <= hi:
            raise InvalidRequest(
                f"scale: n={n} is outside [min_workers={self.spec.min_workers}, "
                f"max_workers={hi}]; set max_workers in the job spec to allow more"
            )
        if self.state.terminal:
            raise InvalidTransition(f"scale: the job is already {self.state.value}")
        live = sorted(self._live(), key=lambda w: w.id)
        self.event(EventKind.MEMBERSHIP, f"scale requested: {len(live)} -> {n} workers")
        if n < len(live):
            for w in live[n:]:
                self._retire(w)
            live = live[:n]
        self.resizes += 1
        ids = [w.id for w in live]
        next_id = max(self.workers, default=-1) + 1
        ids += list(range(next_id, next_id + max(0, n - len(ids))))
        shards = make_shards(len(self.ds.x_train), len(ids), self.spec.seed + self.resizes)
        for i, wid in enumerate(ids):
            self.shards[wid] = shards[i]
            if wid in self.workers and self.workers[wid].state not in ("dead", "left"):
                self.workers[wid].reshard = shards[i].tolist()
        for wid in ids:
            if wid not in self.workers:
                self._start_join(wid)
        self._wake.set()
        return {"workers": n}

    def _retire(self, w: WorkerSlot) -> None:
        """Remove a worker on request (graceful: its unsent gradients leave their steps)."""
        self.inflight.pop(w.id, None)
        self._close_channel(w)
        self._release_view(w)
        if not self.is_async:
            self.book.leave(w.id)
        w.state = "left"
        with contextlib.suppress(Exception):
            ray.kill(w.actor, no_restart=True)
        self._membership_changed()
        self.event(EventKind.MEMBERSHIP, "worker removed on request", target=f"worker-{w.id}")

    def _record_lost(
        self, step: int, entry_arrived: int, n_used: int, grads: list[torch.Tensor]
    ) -> None:
        """B̂ of a step that lost gradients: ``||G_full - G_applied||`` with the lost
        gradients (kept by the injector for the monitor only) in ``G_full``."""
        lost = self.lost_grads.pop(step, [])
        if not lost or not grads:
            return
        arrived = torch.stack(grads).sum(0)
        full = (arrived + torch.stack(lost).sum(0)) / (entry_arrived + len(lost))
        applied = arrived / n_used
        self.norms.lost_fraction_max = max(
            self.norms.lost_fraction_max, len(lost) / (entry_arrived + len(lost))
        )
        b = float((full - applied).norm())
        self.last_b_hat = max(self.last_b_hat, b)
        self.monitor.record(self.step, b)

    # -- the loop --------------------------------------------------------------------------
    def _finished(self) -> bool:
        if self.is_async:
            return self.version >= self.total_updates
        return self.book.finished()

    def _schedule(self) -> None:
        if self.state.terminal or self.cancel_requested:
            return
        if self.is_async:
            self._schedule_async()
        else:
            self._schedule_steps()

    async def run(self) -> dict[str, Any]:
        """Train until every step is applied, the job fails, or it is cancelled."""
        if self.state == JobState.STARTING:
            self._set_state(JobState.RUNNING, f"{len(self._live())} workers")
        if self.t_run is None:
            self.t_run = time.time()
        self._evaluate()
        wake: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
        while not self.state.terminal:
            if self.cancel_requested:
                self._set_state(JobState.CANCELLED, "cancel requested")
                break
            if self._finished():
                self._set_state(JobState.SUCCEEDED, f"{self.step} steps applied")
                break
            self._tick()
            if self.state.terminal:
                break
            self._schedule()
            if self.journal is not None:
                self.journal.flush()
            waiting = set(self.inflight.values())
            if not waiting and not self._live() and not self.pending_joins:
                self._set_state(JobState.FAILED, "no live workers")
                break
            done_any: set[asyncio.Future[Any]] = set()
            done_any, _ = await asyncio.wait(
                waiting | {wake}, timeout=0.2, return_when=asyncio.FIRST_COMPLETED
            )
            if wake in done_any:
                done_any.discard(wake)
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
            for fut in done_any:
                wid, gen, res, exc = fut.result()
                w = self.workers.get(wid)
                if w is None or w.gen != gen or self.inflight.get(wid) is not fut:
                    continue
                self.inflight.pop(wid, None)
                self._handle_reply(w, res, exc)
        wake.cancel()
        if self.journal is not None:
            self.journal.flush()
        self.t_end = time.time()
        if self.state == JobState.SUCCEEDED or self.step > 0:
            self._evaluate()
        return self.summary()

    # -- control & reporting ------------------------------------------------------------------
    def poll(self, ack_seq: int = 0) -> dict[str, Any]:
        """New records and events since ``ack_seq`` (older ones are dropped as delivered)."""
        self.records = [r for r in self.records if r.seq > ack_seq]
        self.events = [e for e in self.events if e.seq > ack_seq]
        return {"records": list(self.records), "events": list(self.events), "status": self.status()}

    def status(self) -> dict[str, Any]:
        summ = self.monitor.summary(self._bound())
        return {
            "state": self.state.value,
            "step": self.step,
            "total_steps": self.total_steps,
            "workers": [w.public() for w in self.workers.values()],
            "b_hat_max": summ["b_hat_max"],
            "b_hat_mean": summ["b_hat_mean"],
            "bound": summ["bound"],
            "error": self.error,
            "test_accuracy": self.last_eval.get("test_accuracy"),
            "test_loss": self.last_eval.get("test_loss"),
        }

    def cancel(self) -> None:
        self.cancel_requested = True
        self._wake.set()

    def model_bytes(self) -> bytes:
        load_flat(self.model, self.x)
        buf = io.BytesIO()
        torch.save(
            {
                "state_dict": self.model.state_dict(),
                "spec": self.spec.model_dump(),
                "step": self.step,
            },
            buf,
        )
        return buf.getvalue()

    def summary(self) -> dict[str, Any]:
        end = self.t_end or time.time()
        start = self.t_run or self.t0
        wall = max(end - start, 1e-9)
        cons = self.monitor.summary(self._bound())
        cons["norms"] = {
            "grad_max": self.norms.grad_max,
            "raw_grad_max": self.norms.raw_grad_max,
            "update_max": self.norms.update_max,
        }
        cons["compression_q"] = self.q
        return {
            "job_id": self.job_id,
            "name": self.spec.name,
            "state": self.state.value,
            "error": self.error,
            "final_test_accuracy": self.last_eval.get("test_accuracy"),
            "final_test_loss": self.last_eval.get("test_loss"),
            "final_test_mse": self.last_eval.get("test_mse"),
            "final_dist_to_optimum": self.last_eval.get("dist_to_optimum"),
            "steps": self.step,
            "total_steps": self.total_steps,
            "updates": self.version,
            "wall_seconds": wall,
            "samples": self.samples,
            "samples_per_s": self.samples / wall,
            "mode": self.spec.mode.name,
            "mode_settings": self.spec.mode.model_dump(),
            "workers": self.spec.workers,
            "workers_final": len(self._live()),
            "refused_stale": self.refused,
            "dropped_gradients": self.dropped,
            "restarts": self.restarts,
            "steps_lost": self.steps_lost,
            "recoveries": self._recovery_summary(),
            # seconds from each worker's death to the next applied update
            "recovery_s": [
                r["next_update_after_s"]
                for r in self._recovery_summary()
                if "next_update_after_s" in r
            ],
            "parameters": self.layout.numel,
            "consistency": cons,
            "timing": self.timing.summary(),
            "events": [e.to_dict() for e in self.event_log],
            "versions": _versions(),
            "host": host_id(),
            "pid": os.getpid(),
        }

    def _recovery_summary(self) -> list[dict[str, Any]]:
        out = []
        for r in self.recoveries:
            item: dict[str, Any] = {"kind": r["kind"], "worker": r["worker"]}
            for key in ("t_detected", "t_next_update", "t_rejoined"):
                if key in r:
                    item[key.removeprefix("t_") + "_after_s"] = r[key] - r["t_fault"]
            out.append(item)
        return out

    def inject(self, fault: FaultSpec) -> None:
        """Add a fault to the running plan (targets resolved now, among live workers)."""
        ids = sorted(w.id for w in self._live())
        index = len(self.plan)
        bound = bind_plan([fault], ids, self.spec.seed)[0]
        bound.index = index
        if (
            fault.at_step is None
            and fault.at_s is None
            and fault.steps is None
            and (fault.probability is None)
        ):
            # "now": a fault with no trigger fires at the current step
            bound.spec = fault.model_copy(update={"at_step": self.step})
        self.driver.add(bound)  # self.plan is the driver's list
        for w in self._live():
            w.send_plan = True
        self.event(
            EventKind.INJECT,
            f"injected {fault.kind}",
            target=",".join(f"worker-{t}" for t in bound.targets),
            fault=FaultKind(fault.kind),
        )

    async def shutdown(self) -> None:
        for w in self.workers.values():
            self._close_channel(w)
        for w in self.workers.values():
            if w.state not in ("dead",):
                with contextlib.suppress(Exception):  # already gone
                    ray.kill(w.actor, no_restart=True)
        if self.shm is not None:
            self.shm.close()


@ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=64)  # type: ignore[call-overload]
class Coordinator(CoordinatorCore):
    """The Ray actor: an asyncio actor, so control calls interleave with training."""

    async def ping(self) -> str:
        return self.state.value

    async def poll_async(self, ack_seq: int = 0) -> dict[str, Any]:
        return self.poll(ack_seq)

    async def cancel_async(self) -> None:
        self.cancel()

    async def inject_async(self, fault: FaultSpec) -> None:
        self.inject(fault)

    async def model_bytes_async(self) -> bytes:
        return self.model_bytes()

    async def summary_async(self) -> dict[str, Any]:
        return self.summary()
