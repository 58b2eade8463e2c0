"""Staffing: bringing workers into the running job and taking them out.

:class:`Staffing` acts on what :mod:`.membership` decides: it creates or re-attaches a
worker and hands it to training (its transport, the mode's membership), takes a lost
worker out (and says whether the job still has enough), starts replacements in the
background and carries out a resize. What it needs of the loop is three things, given as
functions (:class:`Life`): whether the job is winding down, how to fail it, and how to wake
it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.coordinator.dataplane import DataPlane
from actors.coordinator.faulting import Loss
from actors.coordinator.membership import Membership
from actors.coordinator.recovery import Recovery
from actors.coordinator.reporting import Reporter
from actors.coordinator.slot import WorkerSlot, kill_process
from actors.coordinator.training import Training
from core.events import EventKind
from core.spec import JobSpec


@dataclass(frozen=True)
class Life:
    """What staffing needs of the loop."""

    winding_down: Callable[[], bool]  # ended, cancelled or finished: start nobody
    ended: Callable[[], bool]  # in a terminal state
    fail: Callable[[str], None]  # end the job as failed, with the reason
    wake: Callable[[], None]  # the loop has news


class Staffing:
    """Adds, loses, replaces and resizes workers (see the module docstring)."""

    def __init__(
        self,
        spec: JobSpec,
        members: Membership,
        train: Training,
        parts: tuple[DataPlane, Recovery, Reporter],
        life: Life,
    ) -> None:
        self.spec, self.members, self.train, self.life = spec, members, train, life
        self.data, self.recovery, self.reporter = parts
        self._tasks: set[asyncio.Future[Any]] = set()

    async def add(
        self,
        wid: int,
        shard: np.ndarray,
        sampler_state: dict[str, Any] | None = None,
        min_gen: int = 0,
    ) -> WorkerSlot | None:
        """Create worker ``wid`` and add it to the job (``None``: it did not start)."""
        slot = self.members.spawn(
            wid, shard, sampler_state, self.train.evaluation.mean_buffers(), min_gen=min_gen
        )
        return slot if await self.attach(slot) else None

    async def attach(self, slot: WorkerSlot, reattached: bool = False) -> bool:
        """Probe a worker and add it to the job (its transport, the mode's membership)."""
        if not await self.members.probe(slot, self.data.shm, reattached):
            return False
        self.train.attach(slot)
        self.recovery.save_members(self.members.members())
        return True

    async def bring(
        self, wid: int, members: dict[int, int], samplers: dict[int, dict[str, Any]]
    ) -> None:
        """Start-up: re-attach worker ``wid`` of an earlier coordinator (``members``: id ->
        generation), or start it anew."""
        if wid in members:
            slot = await self.members.reattach(
                wid, members[wid], samplers.get(wid), self.train.evaluation.mean_buffers()
            )
            if slot is not None and await self.attach(slot, reattached=True):
                return
            # the earlier incarnation may live on unreachable: a new generation's name (and
            # that one gone, with its CPUs)
            self.members.kill_named(wid, members[wid])
        gen = members[wid] + 1 if wid in members else 0
        await self.add(wid, self.members.shards[wid], samplers.get(wid), gen)

    def replace_unstarted(self, ids: list[int]) -> None:
        """Start-up left some of ``ids`` dead (enough others started): start each once more,
        as a lost worker is replaced (a failure of that start is not retried); nothing
        without ``replace_lost_workers``."""
        if not self.spec.replace_lost_workers:
            return
        now = time.time()
        for wid in ids:
            w = self.members.workers.get(wid)
            if w is not None and w.state == "dead":
                self.members.pending_joins.append((now, wid))

    def lose(self, w: WorkerSlot, why: str, keep_actor: bool = False) -> None:
        """Take a worker out of the membership; the job fails below ``min_workers``."""
        if w.gone:
            return
        self.members.mark_lost(w, keep_actor)
        left = self.train.leave(w)
        why += f"; left steps {left}" if left else ""
        self.reporter.event(EventKind.DETECT, why, target=f"worker-{w.id}")
        self.recovery.save_members(self.members.members())
        self.changed()
        ready = self.members.ready()
        if len(ready) < self.spec.min_workers:
            self.life.fail(
                f"{len(ready)} live workers < min_workers={self.spec.min_workers} (the last "
                f"lost: {why})"
            )

    def apply_loss(self, loss: Loss) -> None:
        """Carry out a loss the fault plan or a reply decided."""
        if loss.fatal is not None and not self.life.ended():
            self.life.fail(loss.fatal)
        self.lose(loss.worker, loss.why, keep_actor=loss.keep_actor)
        if loss.kill:
            kill_process(loss.worker)

    def changed(self) -> None:
        """A worker left: updates may have become applicable."""
        if not self.life.ended():
            self.train.apply_ready()
            self.life.wake()

    def start_join(self, wid: int) -> None:
        """(Re)start worker ``wid`` in the background with its shard."""
        if self.life.winding_down():
            return
        old = self.members.workers.get(wid)
        if old is not None and not old.gone:
            return
        old, shard, sampler = self.members.placeholder(wid)
        self.reporter.event(
            EventKind.MEMBERSHIP,
            "starting a worker" + (" (rejoin)" if old else ""),
            target=f"worker-{wid}",
        )

        async def join() -> None:
            if await self.add(wid, shard, sampler) is not None:
                self.reporter.worker_rejoined(wid, time.time())
            self.life.wake()

        self.spawn(join())

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background (kept referenced until it ends)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def resize(self, n: int) -> None:
        """Grow or shrink to ``n`` workers (checked by the caller); data is re-sharded."""
        live = self.members.live()
        self.reporter.event(EventKind.MEMBERSHIP, f"scale requested: {len(live)} -> {n} workers")
        plan = self.members.plan_resize(n)
        for w in plan.retire:
            self.train.leave(w)
            self.members.retire(w)
            self.changed()
        for wid in plan.start:
            self.start_join(wid)
        self.life.wake()
