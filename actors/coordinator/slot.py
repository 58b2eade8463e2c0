"""The coordinator's record of one worker incarnation, and how its process is killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from actors.channel import CoordinatorEnd
from actors.transport import ShmRef, host_id

GONE = ("dead", "left")


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
    last_step: int | None = None
    steps_done: int = 0
    t_dispatch: float = 0.0
    sampler: dict[str, int] | None = None  # sampler position after its last reply
    reshard: list[int] | None = None  # new shard, sent with the next request
    send_plan: bool = False  # the fault plan changed: send it with the next request
    partition_until: float | None = None  # replies are held back until then (t_s)
    partition_held: tuple[Any, Any] | None = None
    lost_at: float | None = None  # wall time its loss was detected
    t_partition: float = 0.0
    channel: CoordinatorEnd | None = None  # same-host pipe; None: Ray calls
    serve_task: asyncio.Future[Any] | None = None
    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def gone(self) -> bool:
        return self.state in GONE

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


def kill_process(w: WorkerSlot) -> None:
    """Kill a worker's process for real: SIGKILL on this host, Ray's kill elsewhere."""
    if w.host == host_id() and w.pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGKILL)
    elif w.actor is not None:  # a placeholder has none (and ray.kill would start Ray)
        with contextlib.suppress(Exception):
            ray.kill(w.actor, no_restart=True)
