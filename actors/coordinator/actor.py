"""The coordinator as a Ray actor: an asyncio actor, so control calls interleave with
training (:class:`~actors.coordinator.loop.CoordinatorCore` holds the logic)."""

from __future__ import annotations

from typing import Any

import ray

from actors.coordinator.loop import CoordinatorCore
from core.spec import FaultSpec


# max_concurrency: run, poll, scale, inject and cancel are coroutines on one event loop;
# 64 leaves room for many concurrent pollers
@ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=64)  # type: ignore[call-overload]
class Coordinator(CoordinatorCore):
    """The Ray actor (named ``core.names.coordinator_name(job_id)`` by the service)."""

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
