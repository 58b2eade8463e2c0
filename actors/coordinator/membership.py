"""Membership: which workers the job has, where they run, and who comes or goes.

A :class:`~actors.coordinator.slot.WorkerSlot` is the coordinator's record of one worker
incarnation. The :class:`Membership` creates workers (detached, named actors, so they
outlive a crash of the coordinator and are re-attached by name), probes where they run,
marks them lost or retired, plans resizes (which workers leave, which ids are new, every
shard re-cut) and keeps the queue of workers to (re)start. It returns what it decided; the
loop tells the mode and the data plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray

from actors.coordinator.reporting import Reporter
from actors.coordinator.slot import WorkerSlot
from actors.faults import ActiveFault
from actors.messages import Launch, WorkerInit
from actors.sampler import make_shards
from actors.transport import ShmPool
from actors.worker import Worker
from core.errors import InvalidRequest
from core.events import EventKind
from core.names import NAMESPACE, worker_name
from core.spec import JobSpec

# a re-attach ping answers in milliseconds; 5 s covers a loaded 2-core machine
REATTACH_PING_S = 5.0


def worker_template(
    spec: JobSpec, data_dir: str | None, plan: list[ActiveFault], t0: float
) -> WorkerInit:
    """What every worker of the job is created with: the spec, not data (each worker builds
    the task and opens its training set itself); id, shard, sampler and buffers are filled
    in per worker."""
    return WorkerInit(
        worker_id=-1,
        spec=spec,
        data_dir=data_dir,
        shard=np.zeros(0, dtype=np.int64),
        sampler_state=None,
        faults=plan,  # the plan's own list: live injections reach new workers too
        t0=t0,
    )


# Stale incarnations of one worker id skipped at most when a new one starts (each a killed
# actor of an earlier coordinator; a handful at most in practice).
MAX_STALE_GENERATIONS = 64
# the error's own line is what a user acts on; its traceback stays in the worker's log
_MAX_ERROR_CHARS = 500


def start_error(exc: BaseException) -> str:
    """A worker's start failure in a line: the error its constructor raised (a task's
    ``build_model`` or ``train_data``) and where the traceback is."""
    cause = getattr(exc, "cause", None)  # RayActorError: the creation task's exception
    inner = getattr(cause, "cause", None) if cause is not None else None
    err = inner if isinstance(inner, BaseException) else cause
    if isinstance(err, BaseException):
        text = str(err).strip().splitlines()
        first = text[-1] if text else ""
        msg = f"{type(err).__name__}: {first}"[:_MAX_ERROR_CHARS]
        return f"{msg} (traceback: the worker's log, in Ray's session logs)"
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:_MAX_ERROR_CHARS]


@dataclass
class Resize:
    """A planned resize: who leaves, which new ids start."""

    retire: list[WorkerSlot]
    start: list[int]


class Membership:
    """The job's workers (see the module docstring).

    Args:
        job_id: names the worker actors.
        spec: the job.
        reporter: membership events go here.
        n_train: training-set size (shards are cut from it).
        launch: the memory each worker asks Ray for and how long its start may take.
    """

    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        reporter: Reporter,
        n_train: int,
        launch: Launch | None = None,
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.launch = launch or Launch()
        self.reporter = reporter
        self.n_train = n_train
        self.workers: dict[int, WorkerSlot] = {}
        self.shards: dict[int, np.ndarray] = {}
        self.pending_joins: list[tuple[float, int]] = []  # (wall time due, worker id)
        self.resizes = 0
        self.template: WorkerInit | None = None  # what every worker is created with
        # why the first worker that failed to start failed (the job's error if too few start)
        self.start_failure: str | None = None

    def check_size(self, n: int) -> None:
        """Refuse a size outside ``[min_workers, max_workers]``.

        Raises:
            InvalidRequest: naming the limit to change.
        """
        hi = self.spec.max_workers_or_workers
        if not self.spec.min_workers <= n <= hi:
            raise InvalidRequest(
                f"scale: n={n} is outside [min_workers={self.spec.min_workers}, "
                f"max_workers={hi}]; set max_workers in the job spec to allow more"
            )

    def live(self) -> list[WorkerSlot]:
        """Workers not dead or left, by id."""
        return sorted((w for w in self.workers.values() if not w.gone), key=lambda w: w.id)

    def ready(self) -> list[WorkerSlot]:
        """Live workers past start-up."""
        return [w for w in self.live() if w.state != "starting"]

    def members(self) -> dict[int, int]:
        """Live worker ids and their incarnations (what a restarted coordinator adopts)."""
        return {w.id: w.gen for w in self.ready()}

    def cut_shards(self, ids: list[int]) -> None:
        """New shards for ``ids`` (seeded by the resize count: a resize re-cuts them all)."""
        shards = make_shards(self.n_train, len(ids), self.spec.seed + self.resizes)
        for i, wid in enumerate(ids):
            self.shards[wid] = shards[i]

    def _worker_options(self, wid: int, gen: int) -> dict[str, Any]:
        r = self.spec.resources
        gpus: float = 0.0
        if r.worker_gpus == "auto":
            total = ray.cluster_resources().get("GPU", 0.0)
            if total > 0:
                gpus = min(1.0, total / max(self.spec.workers, 1))
        else:
            gpus = float(r.worker_gpus)
        opts: dict[str, Any] = {
            "num_cpus": r.worker_cpus,
            "num_gpus": gpus,
            "scheduling_strategy": "SPREAD",
            # detached and named: the worker outlives a coordinator crash and is re-attached
            "lifetime": "detached",
            "name": worker_name(self.job_id, wid, gen),
            "namespace": NAMESPACE,
        }
        if self.launch.worker_memory_bytes > 0:
            # Ray's scheduler places the worker only where this much memory is unreserved
            opts["memory"] = self.launch.worker_memory_bytes
        return opts

    def _unplaced(self) -> str:
        """Why a worker was not placed: what it asks for, what the cluster has free."""
        r = self.spec.resources
        need = f"CPU={r.worker_cpus:g}"
        if self.launch.worker_memory_bytes > 0:
            need += f", memory={self.launch.worker_memory_bytes / (1 << 30):.2f} GiB"
        try:
            free = ray.available_resources()
            mem_gib = free.get("memory", 0.0) / (1 << 30)
            has = f"CPU={free.get('CPU', 0.0):g}, memory={mem_gib:.2f} GiB"
        except Exception:  # noqa: BLE001 - only for the message
            has = "unknown resources"
        return (
            f"not placed within {self.launch.worker_start_timeout_s:g} s: it needs {need}, "
            f"the cluster has {has} free"
        )

    def spawn(
        self,
        wid: int,
        shard: np.ndarray,
        sampler_state: dict[str, Any] | None,
        buffers: np.ndarray | None = None,
        min_gen: int = 0,
    ) -> WorkerSlot:
        """Create worker ``wid``'s next incarnation (not yet probed), starting from the
        job's averaged ``buffers`` when there are any; its generation is at least
        ``min_gen`` (a restarted coordinator: past the incarnations it knows of)."""
        assert self.template is not None, "start() sets the template first"
        init = replace(
            self.template,
            worker_id=wid,
            shard=shard,
            sampler_state=sampler_state,
            buffers=buffers,
        )
        old = self.workers.get(wid)
        gen = max(old.gen + 1 if old is not None else 0, min_gen)
        # an incarnation this coordinator does not know of (an earlier coordinator's, not
        # re-attached) may still hold the name: it is stale; take the next free generation
        for _ in range(MAX_STALE_GENERATIONS):
            if not self._name_taken(wid, gen):
                break
            self.kill_named(wid, gen)
            gen += 1
        actor = Worker.options(**self._worker_options(wid, gen)).remote(init)  # type: ignore[attr-defined]
        slot = WorkerSlot(id=wid, actor=actor, shard=init.shard, gen=gen)
        self.shards[wid] = init.shard
        self.workers[wid] = slot
        return slot

    def _named(self, wid: int, gen: int) -> Any | None:
        """The actor holding incarnation ``gen`` of worker ``wid``'s name, if any."""
        try:
            return ray.get_actor(worker_name(self.job_id, wid, gen), namespace=NAMESPACE)
        except ValueError:
            return None

    def _name_taken(self, wid: int, gen: int) -> bool:
        return self._named(wid, gen) is not None

    def kill_named(self, wid: int, gen: int) -> None:
        """Kill incarnation ``gen`` of worker ``wid`` by its name, if it still exists."""
        with contextlib.suppress(Exception):  # gone already, or meanwhile
            actor = self._named(wid, gen)
            if actor is not None:
                ray.kill(actor)

    async def reattach(
        self,
        wid: int,
        gen: int,
        sampler_state: dict[str, Any] | None,
        buffers: np.ndarray | None = None,
    ) -> WorkerSlot | None:
        """Adopt a worker that outlived the previous coordinator incarnation (its sampler
        and buffers go back to the checkpoint's)."""
        try:
            actor = ray.get_actor(worker_name(self.job_id, wid, gen), namespace=NAMESPACE)
            await asyncio.wait_for(actor.ping.remote(), timeout=REATTACH_PING_S)
            if sampler_state is not None:
                await actor.reset_sampler.remote(sampler_state)
            if buffers is not None:
                await actor.set_buffers.remote(buffers)
        except Exception:  # noqa: BLE001 - gone or unreachable: start a new one instead
            return None
        slot = WorkerSlot(id=wid, actor=actor, shard=self.shards[wid], gen=gen)
        self.workers[wid] = slot
        return slot

    async def probe(self, slot: WorkerSlot, shm: ShmPool | None, reattached: bool) -> bool:
        """Learn where a worker runs and pick its transport; False if it failed to start."""
        try:
            try:
                info = await asyncio.wait_for(
                    slot.actor.info.remote(), timeout=self.launch.worker_start_timeout_s
                )
            except TimeoutError:
                # never placed (or never answering): it must not be placed later either
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=True)
                raise RuntimeError(self._unplaced()) from None
            shm_ok = False
            if shm is not None:
                shm_ok = await slot.actor.shm_ok.remote(shm.probe_path())
                if not shm_ok and self.spec.transport == "shared_memory":
                    raise RuntimeError(
                        "transport=shared_memory but the worker is on another "
                        "host; use transport=auto or object_store"
                    )
        except Exception as exc:  # noqa: BLE001 - any failure to start is a lost worker
            slot.state = "dead"
            why = start_error(exc)
            if self.start_failure is None:
                self.start_failure = f"worker {slot.id} failed to start: {why}"
            self.reporter.event(
                EventKind.MEMBERSHIP,
                f"worker failed to start: {why}",
                target=f"worker-{slot.id}",
            )
            return False
        slot.node, slot.host, slot.pid = info["node"], info["host"], info["pid"]
        slot.shm = shm_ok
        slot.grad_ref = shm.grad_slot(slot.id) if shm is not None and shm_ok else None
        slot.state = "idle"
        # node ids are 56 hex digits; 8 tell the nodes of a cluster apart in an event
        self.reporter.event(
            EventKind.MEMBERSHIP,
            f"worker {'re-attached' if reattached else 'joined'} (node {slot.node[:8]}, "
            f"pid {slot.pid}, {'shared memory' if shm_ok else 'object store'})",
            target=f"worker-{slot.id}",
        )
        return True

    def mark_lost(self, w: WorkerSlot, keep_actor: bool) -> None:
        """``w`` is dead; queue a replacement unless told otherwise (or one is queued)."""
        w.state = "dead"
        w.lost_at = time.time()
        self.reporter.worker_lost(w.id, w.lost_at)
        rejoining = any(wid == w.id for _, wid in self.pending_joins)
        if not keep_actor and not rejoining and self.spec.replace_lost_workers:
            self.pending_joins.append((time.time(), w.id))

    def retire(self, w: WorkerSlot) -> None:
        """Remove a worker on request (its actor is killed)."""
        w.state = "left"
        if w.actor is not None:  # a placeholder has none (and ray.kill would start Ray)
            with contextlib.suppress(Exception):
                ray.kill(w.actor, no_restart=True)
        self.reporter.event(
            EventKind.MEMBERSHIP, "worker removed on request", target=f"worker-{w.id}"
        )

    def plan_resize(self, n: int) -> Resize:
        """Resize to ``n`` workers: the highest ids leave, new ids start, shards re-cut
        (live workers get theirs with their next request)."""
        live = self.live()
        retire = live[n:] if n < len(live) else []
        keep = live[:n]
        self.resizes += 1
        ids = [w.id for w in keep]
        next_id = max(self.workers, default=-1) + 1
        new = list(range(next_id, next_id + max(0, n - len(ids))))
        self.cut_shards(ids + new)
        for w in keep:
            w.reshard = self.shards[w.id].tolist()
        return Resize(retire=retire, start=new)

    def kill_all(self) -> None:
        """Kill every worker actor still there (the job ended)."""
        for w in self.workers.values():
            if w.state != "dead" and w.actor is not None:
                with contextlib.suppress(Exception):  # already gone
                    ray.kill(w.actor, no_restart=True)

    def due_joins(self, now: float) -> list[int]:
        """Workers whose (re)start is due now (taken off the queue)."""
        due = [wid for t, wid in self.pending_joins if t <= now]
        self.pending_joins = [(t, wid) for t, wid in self.pending_joins if t > now]
        return due

    def placeholder(self, wid: int) -> tuple[WorkerSlot | None, np.ndarray, dict[str, Any] | None]:
        """Reserve ``wid``'s next incarnation; returns the old slot, its shard and the sampler
        state to continue from."""
        old = self.workers.get(wid)
        self.workers[wid] = WorkerSlot(
            id=wid, actor=None, state="starting", gen=(old.gen + 1) if old else 0
        )
        shard = self.shards.get(wid)
        if shard is None:
            shard = make_shards(self.n_train, 1, self.spec.seed)[0]
        sampler = None
        if old is not None and old.sampler is not None:
            sampler = {
                **old.sampler,
                "seed": self.spec.seed,
                "shard_key": wid,
                "shard": shard.tolist(),
            }
        return old, shard, sampler
