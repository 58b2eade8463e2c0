"""The data plane: views out to the workers, gradients back, over the right transport.

Per worker the transport is chosen once (:meth:`Membership.probe`): shared memory
(``/dev/shm`` files, zero-copy) with a same-host pipe for the small request and reply frames
(:mod:`actors.channel`), or Ray's object store and actor calls. Identical views share one
copy: a small cache keyed by the view's identity (:data:`actors.modes.base.ViewKey`),
emptied whenever the model of record changes. A mode that keeps ``x`` still while workers
read it (``shares_model_slot``) gets ``x`` itself placed in shared memory, so the view of
``x`` costs no copy at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import ray
import torch

from actors.channel import CoordinatorEnd, make_pair
from actors.coordinator.slot import WorkerSlot
from actors.faults import ActiveFault
from actors.messages import GradientReply, GradientRequest
from actors.modes.base import Dispatch, ViewKey
from actors.transport import ShmPool, ShmRef, from_wire, sweep_stale, to_wire
from core.spec import JobSpec

# views kept for sharing: a step hands out at most a few distinct views (x, and up to
# max_lag provisional ones in elastic), 8 covers them with room
VIEW_CACHE_SIZE = 8

# (worker, generation, reply or None, error or None): what every in-flight future yields
Outcome = tuple[int, int, GradientReply | None, BaseException | None]


class DataPlane:
    """Transports, the view cache and gradient decoding of one job.

    Args:
        job_id: names the shared-memory folder.
        spec: the job (transport, wire dtype).
        numel: parameters of the model.
    """

    def __init__(self, job_id: str, spec: JobSpec, numel: int) -> None:
        self.job_id = job_id
        self.spec = spec
        self.numel = numel
        self.shm: ShmPool | None = None
        self.x_ref: ShmRef | None = None
        self.view_cache: OrderedDict[Any, Any] = OrderedDict()

    def open(self, x: torch.Tensor, share_model: bool) -> torch.Tensor:
        """Set up shared memory (unless the job uses the object store only); returns the
        model of record, moved into shared memory if ``share_model``."""
        sweep_stale(self.job_id)
        if self.spec.transport != "object_store":
            self.shm = ShmPool(self.job_id, self.numel)
            if share_model:
                x, self.x_ref = self.shm.model_slot(x)
        return x

    # -- views -------------------------------------------------------------------------------
    def publish(self, w: WorkerSlot, key: ViewKey, vec: torch.Tensor) -> Any:
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
        while len(self.view_cache) > VIEW_CACHE_SIZE:
            old_key, old = self.view_cache.popitem(last=False)
            if old_key[0] == "shm" and self.shm is not None:
                self.shm.release(old[0])

    def invalidate(self) -> None:
        """The model of record changed: no cached view is current any more."""
        for key in list(self.view_cache):
            old = self.view_cache.pop(key)
            if key[0] == "shm" and self.shm is not None:
                self.shm.release(old[0])

    def release_view(self, w: WorkerSlot) -> None:
        if w.view_slot is not None and self.shm is not None:
            self.shm.release(w.view_slot)
        w.view_slot = None

    # -- gradients ---------------------------------------------------------------------------
    def decode(self, w: WorkerSlot, reply: GradientReply) -> torch.Tensor:
        """The gradient a reply carries, as a float32 tensor."""
        if reply.payload is not None:
            return torch.from_numpy(reply.payload.decode())
        if reply.grad_in_slot:
            assert self.shm is not None
            return self.shm.grad(w.id)
        assert reply.grad is not None, "a reply carries its gradient one way or another"
        return from_wire(reply.grad, self.spec.transfer_dtype)

    # -- requests ----------------------------------------------------------------------------
    def request(
        self,
        w: WorkerSlot,
        d: Dispatch,
        *,
        want_residual: bool,
        local_steps: int,
        plan: list[ActiveFault],
    ) -> GradientRequest:
        """The request that starts ``w`` on ``d`` (pending reshard and plan included)."""
        req = GradientRequest(
            step=d.step,
            view=self.publish(w, d.key, d.view),
            want_residual=want_residual,
            grad_slot=w.grad_ref,
            local_steps=local_steps,
        )
        if w.reshard is not None:
            req.reshard, w.reshard = w.reshard, None
        if w.send_plan:
            req.faults, w.send_plan = list(plan), False
        return req

    def send(self, w: WorkerSlot, req: GradientRequest) -> asyncio.Future[Outcome]:
        """Send ``req``; the future resolves with the reply (over the pipe, the loop's
        reply handler resolves it)."""
        if w.channel is not None:
            fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            w.channel.send(req)
            return fut
        ref = w.actor.compute.remote(req)
        return asyncio.ensure_future(_await_reply(w.id, w.gen, ref))

    # -- same-host channels ------------------------------------------------------------------
    def open_channel(self, w: WorkerSlot, on_reply: Callable[[Any], None]) -> Any:
        """Requests and replies over a FIFO pair; returns the serving call's ref (it fails
        when the worker dies: Ray watches the process for us)."""
        assert self.shm is not None
        req, rep = make_pair(str(self.shm.dir), w.id)
        w.channel = CoordinatorEnd(req, rep, on_reply)
        return w.actor.serve_pipe.remote(req, rep)

    def close_channel(self, w: WorkerSlot) -> None:
        if w.channel is not None:
            with contextlib.suppress(OSError):
                w.channel.send(None)
            w.channel.close()
            w.channel = None

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()


async def _await_reply(wid: int, gen: int, ref: Any) -> Outcome:
    try:
        return wid, gen, await ref, None
    except Exception as exc:  # noqa: BLE001 - a dead worker is data, not a crash
        return wid, gen, None, exc
