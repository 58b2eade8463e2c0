"""The typed messages between the coordinator and its workers.

Four messages cross the coordinator-worker boundary, over a Ray call or the same-host pipe
(:mod:`actors.channel`, which pickles them; every field here pickles):

* :class:`WorkerInit`: everything a worker is created with (the spec, its shard, the plan,
  ...); never data: the worker opens its task's training set itself.
* :class:`GradientRequest`: one step's work: the view to compute on and what to send back.
* :class:`BlockReady`: one parameter block of the gradient is in the slot (same-host
  streaming, ahead of the reply).
* :class:`GradientReply`: the worker's answer: loss, norms, timing, and the gradient (in
  the worker's shared-memory slot, as an array, or as a compressed payload).

A "gradient" is whatever the consistency mode asks the worker to compute: one stochastic
gradient, or for ``local`` mode the sum of ``local_steps`` gradients along the worker's own
plain-SGD trajectory (the model delta divided by the learning rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.compression import Payload
from actors.faults import ActiveFault
from actors.transport import ShmRef
from core.spec import JobSpec


@dataclass
class WorkerInit:
    """How a worker is created.

    Attributes:
        worker_id: the worker's id in the job (stable across rejoins).
        spec: the job (the worker builds its task from it and opens the training set
            itself: no data crosses Ray).
        data_dir: the operator's data directory (``TaskContext.data_dir``), if any.
        shard: training-set indices this worker samples from.
        sampler_state: resume the sampler from here (after a restart), else start fresh.
        faults: the job's bound fault plan.
        t0: wall time the job started (fault windows in seconds are relative to it).
        grad_slot: shared-memory slot for gradients, if the worker shares the host.
        buffers: the job's averaged floating buffers to start from (a new or restored
            worker; ``None``: the model's own, as built).
    """

    worker_id: int
    spec: JobSpec
    data_dir: str | None
    shard: np.ndarray
    sampler_state: dict[str, Any] | None
    faults: list[ActiveFault]
    t0: float
    grad_slot: ShmRef | None = None
    buffers: np.ndarray | None = None


@dataclass
class GradientRequest:
    """One step's work for a worker.

    Attributes:
        step: the step (or round, or async step) the gradient is for.
        view: the parameters to compute on: a shared-memory handle, a wire array, or a Ray
            object ref to a wire array (the worker fetches it).
        want_residual: send the error-feedback memory back (B̂ measures it).
        grad_slot: the shared-memory slot to write the gradient into from now on.
        reshard: a new shard (after a resize), applied before the batch is drawn.
        faults: the updated fault plan (after a live injection).
        local_steps: plain-SGD steps to take on the worker's own replica (``local`` mode);
            1 means one gradient on the view.
        stream_blocks: announce each parameter block with a :class:`BlockReady` frame as
            soon as backward has written it into the gradient slot (per-block elastic, same
            host, uncompressed, one local step).
        local_lr: the lr of the plain-SGD local steps (``local`` mode): the step's base lr
            under the job's schedule; ``None``: ``optimizer.lr``.
    """

    step: int
    view: Any
    want_residual: bool = False
    grad_slot: ShmRef | None = None
    reshard: list[int] | None = None
    faults: list[ActiveFault] | None = None
    local_steps: int = 1
    stream_blocks: bool = False
    local_lr: float | None = None


@dataclass
class BlockReady:
    """One parameter block of a gradient is in the worker's shared-memory slot.

    Sent over the same-host channel ahead of the :class:`GradientReply` of the same step.

    Attributes:
        worker: the worker's id.
        step: the request's step.
        block: the block's index (:meth:`actors.flat.ParamLayout.blocks`).
        norm: the block's L2 norm.
        loss: the batch's loss (known before backward writes the first block), so a step
            completed from streamed blocks ahead of its replies still records its loss.
    """

    worker: int
    step: int
    block: int
    norm: float
    loss: float = math.nan


@dataclass
class GradientReply:
    """A worker's answer to a :class:`GradientRequest`.

    Exactly one of ``grad_in_slot``, ``grad`` and ``payload`` carries the gradient.

    Attributes:
        worker: the worker's id.
        step: the request's step.
        loss: mean training loss of the batches drawn.
        n: samples drawn.
        raw_norm: norm of the gradient before compression.
        sent_norm: norm of what was sent (after compression).
        compute_s: seconds the worker spent computing.
        delay_s: seconds of injected straggler delay.
        corrupted: the fault plan corrupted this gradient (the injector's mark, for
            accounting only: the coordinator screens the values themselves).
        sampler_pos: the sampler's position after the batch (``epoch``, ``pos``).
        grad_in_slot: the gradient is in the worker's shared-memory slot.
        grad: the gradient as a wire array (object-store transport).
        payload: the compressed gradient.
        residual: the error-feedback memory, when it was asked for.
        buffers: the worker's floating persistent buffers after the batch (BatchNorm
            running statistics) as one float32 vector; ``None`` for a model without any.
    """

    worker: int
    step: int
    loss: float
    n: int
    raw_norm: float
    sent_norm: float
    compute_s: float = 0.0
    delay_s: float = 0.0
    corrupted: bool = False
    sampler_pos: dict[str, int] = field(default_factory=dict)
    grad_in_slot: bool = False
    grad: np.ndarray | None = None
    payload: Payload | None = None
    residual: np.ndarray | None = None
    buffers: np.ndarray | None = None


@dataclass(frozen=True)
class Launch:
    """How the coordinator starts its workers (the driver works it out before the start).

    Attributes:
        worker_memory_bytes: the memory each worker asks Ray for (Ray's ``memory``
            resource: the scheduler places a worker only where that much is unreserved);
            0 asks for none.
        worker_start_timeout_s: a worker not placed and answering within this many seconds
            counts as failed to start (with the reason), so a start never hangs.
    """

    worker_memory_bytes: int = 0
    # the service's ESGD_START_TIMEOUT_S default
    worker_start_timeout_s: float = 120.0
