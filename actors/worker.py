"""The worker actor: the job's task, a model replica, and a seeded sampler over its shard.

A worker builds the job's task itself (:func:`actors.tasks.loader.job_task`), its model in
``train()`` mode, and opens the task's training set itself: a ``DataLoader`` driven by the
seeded :class:`~actors.sampler.ShardSampler` reads only the indices of its shard
(:class:`actors.tasks.runtime.ShardLoader`; docs/tasks.md). Each
:meth:`WorkerCore.compute` takes a :class:`~actors.messages.GradientRequest`: a *view* of
the parameters (a shared-memory handle or an object-store array), takes the next batch,
computes ``task.loss`` on that view (``torch.func.functional_call`` with the view's pieces
as the parameters, under bfloat16 autocast when the job asks for it) and its gradient, and
hands it back, with the worker's floating buffers (BatchNorm statistics), in a
:class:`~actors.messages.GradientReply` (into its shared-memory slot, or as an array, or as
a compressed payload with error-feedback memory).

What a worker computes is the consistency mode's choice (``local_steps`` of the request):
with 1 it is one stochastic gradient on the view; with ``H > 1`` (``local`` mode) the worker
takes ``H`` plain SGD steps ``y_{t+1} = y_t - lr g(y_t)`` on its own replica ``y_0 = view``
(no momentum, no weight decay: those are the coordinator's optimizer's business) and sends
``sum_t g(y_t) = (view - y_H) / lr``, the model delta in gradient units. With ``H = 1`` that
is exactly the one gradient, so ``local`` with ``H = 1`` is ``sync``.

The fault plan is consulted on the way (:class:`actors.faults.WorkerFaults`): a ``corrupt``
fault alters the gradient after it is computed and before it is compressed and sent (the
reply's ``corrupted`` flag says so, for accounting only), a ``delay`` stalls the reply
(crashes, drops and partitions are carried out by the coordinator, see
:mod:`actors.faults.engine`). The worker uses ``cuda`` when Ray gave it a GPU, the CPU
otherwise.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch.func import functional_call

from actors.channel import serve
from actors.compression import ErrorFeedback, Payload, make_compressor
from actors.faults import WorkerFaults
from actors.flat import ParamLayout
from actors.messages import BlockReady, GradientReply, GradientRequest, WorkerInit
from actors.sampler import ShardSampler
from actors.tasks.base import TaskContext
from actors.tasks.loader import job_task
from actors.tasks.runtime import Buffers, LossOf, ShardLoader, autocast, to_device
from actors.transport import ShmCache, ShmRef, from_wire, host_id, to_wire


class WorkerCore:
    """Everything a worker does, without Ray (so it can be driven in-process too).

    Args:
        init: what the worker is created with (arrays, not object refs, here).
    """

    def __init__(self, init: WorkerInit) -> None:
        spec = init.spec
        torch.set_num_threads(spec.resources.torch_threads)
        self.id = init.worker_id
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        data_dir = None if init.data_dir is None else Path(init.data_dir)
        # the worker builds the task and opens its training set itself (nothing but the
        # spec crosses Ray); a task that raises here fails the worker's start with its error
        self.task = job_task(spec, data_dir)
        torch.manual_seed(spec.seed)
        self.model = self.task.build_model().to(self.device)
        self.model.train()  # dropout and batch statistics on: buffers are this worker's
        self.layout = ParamLayout.of(self.model)
        self.buffers = Buffers.of(self.model)
        if init.buffers is not None:
            self.buffers.write(self.model, init.buffers)  # the job's averaged statistics
        self.loss_of = LossOf(self.task, self.model)
        self.param_names = tuple(f"model.{n}" for n in self.layout.names)
        ctx = TaskContext(seed=spec.seed, worker_id=self.id, data_dir=data_dir, device=self.device)
        train = self.task.train_data(ctx)
        if init.sampler_state is not None:
            sampler = ShardSampler.from_state(init.sampler_state)
        else:
            sampler = ShardSampler(np.asarray(init.shard), seed=spec.seed, shard_key=self.id)
        self.batches = ShardLoader(
            self.task,
            train,
            sampler,
            spec.batch_size,
            loader_workers=spec.loader_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.faults = WorkerFaults(init.faults, self.id, spec.seed)
        self.t0 = init.t0
        self.shm = ShmCache()
        self.grad_slot = init.grad_slot
        self.local_grad = torch.zeros(self.layout.numel)
        self.compressor = None
        self.ef: ErrorFeedback | None = None
        if spec.compression.name != "none":
            self.compressor = make_compressor(spec.compression, self.layout.numel)
            if spec.compression.error_feedback:
                self.ef = ErrorFeedback(self.compressor, self.layout.numel)
        self.rng = np.random.default_rng([spec.seed, 31337, self.id])  # fixed salt
        # writes a frame ahead of the reply (same-host channel only; None elsewhere)
        self.emit: Callable[[Any], None] | None = None

    def _bind_emit(self, emit: Callable[[Any], None]) -> None:
        self.emit = emit

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return {
            "id": self.id,
            "pid": os.getpid(),
            "host": host_id(),
            "node": ctx.get_node_id() if ctx else "local",
            "device": str(self.device),
        }

    def shm_ok(self, probe: str) -> bool:
        """True if this process can read the coordinator's shared folder."""
        try:
            with open(probe) as f:
                return f.read() == host_id()
        except OSError:
            return False

    def _view(self, view: Any) -> torch.Tensor:
        if isinstance(view, ShmRef):
            flat = self.shm.get(view)
        else:
            if isinstance(view, ray.ObjectRef):
                view = ray.get(view)
            with warnings.catch_warnings():
                # object-store arrays are read-only; we never write to the view
                warnings.simplefilter("ignore", UserWarning)
                flat = from_wire(view, self.spec.transfer_dtype)
        return flat.to(self.device) if self.device.type == "cuda" else flat

    def _apply_request(self, req: GradientRequest) -> None:
        if req.grad_slot is not None:
            self.grad_slot = req.grad_slot
        if req.reshard is not None:
            self.reshard(req.reshard)
        if req.faults is not None:
            self.faults.faults = req.faults

    @property
    def sampler(self) -> ShardSampler:
        """The sampler at the position after the last batch used."""
        return self.batches.sampler

    def _loss(self, pieces: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """``task.loss`` of the next batch with the model's parameters set to ``pieces``
        (under autocast when the job's precision is bfloat16); with the batch's size."""
        batch = to_device(self.batches.next(), self.device)
        params = dict(zip(self.param_names, pieces, strict=True))
        with autocast(self.device, self.spec.precision):
            loss = functional_call(self.loss_of, params, (batch,))
        return loss, self.spec.batch_size

    def _batch_grads(self, flat: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], float, int]:
        """The gradient of the next batch's loss at ``flat``; with the loss and batch size."""
        pieces = self.layout.pieces(flat)
        loss, n = self._loss(pieces)
        grads = torch.autograd.grad(loss, pieces)
        return grads, float(loss.detach()), n

    def _streamed_grad(
        self, flat: torch.Tensor, step: int, out: torch.Tensor
    ) -> tuple[float, int, float]:
        """One gradient into ``out``, each parameter block announced as backward writes it.

        A hook on each parameter piece fires when that piece's gradient is ready (the last
        layers first): it copies the block into ``out`` (the shared-memory slot) and sends a
        :class:`~actors.messages.BlockReady` frame, so the coordinator can apply the block's
        averaged update before the rest of backward is done.

        Returns:
            The batch's loss, its size, and the gradient's norm (from the blocks' norms).
        """
        emit = self.emit
        assert emit is not None
        pieces = self.layout.pieces(flat)
        loss_of_batch = math.nan  # known once forward is done, before any hook fires
        sq = 0.0  # sum of the blocks' squared norms
        for i, (piece, (lo, hi)) in enumerate(zip(pieces, self.layout.blocks(), strict=True)):

            def ready(g: torch.Tensor, i: int = i, lo: int = lo, hi: int = hi) -> None:
                nonlocal sq
                out[lo:hi].copy_(g.reshape(-1))
                norm = float(out[lo:hi].norm())
                sq += norm * norm
                emit(BlockReady(self.id, step, i, norm, loss_of_batch))

            piece.register_hook(ready)  # type: ignore[no-untyped-call]
        loss, n = self._loss(pieces)
        loss_of_batch = float(loss.detach())
        torch.autograd.grad(loss, pieces)  # the hooks wrote every block
        return loss_of_batch, n, math.sqrt(sq)

    def _local_sum(
        self, flat: torch.Tensor, steps: int, out: torch.Tensor, lr: float | None = None
    ) -> tuple[float, int]:
        """``out = sum_t g(y_t)`` over ``steps`` plain SGD steps at ``lr`` (``None``:
        ``optimizer.lr``) from ``y_0 = flat``.

        Returns:
            The mean loss over the steps and the samples drawn.
        """
        lr = self.spec.optimizer.lr if lr is None else lr
        tmp = torch.empty(self.layout.numel, device=out.device) if steps > 1 else out
        loss_sum, n = 0.0, 0
        for t in range(steps):
            # y_t = y_0 - lr * sum_{s<t} g(y_s)
            replica = flat if t == 0 else flat.add(out, alpha=-lr)
            grads, loss, k = self._batch_grads(replica)
            if t == 0:
                self.layout.write_grads(grads, out)
            else:
                self.layout.write_grads(grads, tmp)
                out.add_(tmp)
            loss_sum, n = loss_sum + loss, n + k
        return loss_sum / steps, n

    def compute(self, req: GradientRequest) -> GradientReply:
        """The mode's gradient on ``req.view`` for ``req.step``; see the module docstring."""
        t_call = time.perf_counter()
        t_s = time.time() - self.t0
        self._apply_request(req)
        flat = self._view(req.view)
        gbuf = self.local_grad
        shm_out = self.grad_slot is not None and self.compressor is None
        if shm_out:
            assert self.grad_slot is not None
            gbuf = self.shm.get(self.grad_slot)
        stream = (
            req.stream_blocks
            and shm_out
            and self.emit is not None
            and req.local_steps == 1
            and self.device.type == "cpu"
        )
        # what the fault plan does to this gradient (a straggler delay, corruptions), decided
        # once; streamed blocks must not outrun the delay, so a streaming worker is slow
        # *before* it computes (the others after)
        effect = self.faults.on_gradient(req.step, t_s)
        delay_s = effect.delay_s
        if stream and delay_s > 0:
            time.sleep(delay_s)
        raw_norm: float | None = None  # known already when the blocks streamed
        if stream:
            loss, n, raw_norm = self._streamed_grad(flat, req.step, gbuf)
        elif self.device.type == "cuda":
            dev = torch.empty(self.layout.numel, device=self.device)
            loss, n = self._local_sum(flat, req.local_steps, dev, req.local_lr)
            gbuf.copy_(dev.cpu())
        else:
            loss, n = self._local_sum(flat, req.local_steps, gbuf, req.local_lr)
        for corruption in effect.corruptions:  # before compression: what is sent is corrupt
            corruption.apply(gbuf)
        if raw_norm is None or effect.corruptions:
            raw_norm = float(gbuf.norm())
        pos = self.sampler.state_dict()
        reply = GradientReply(
            worker=self.id,
            step=req.step,
            loss=loss,
            n=n,
            raw_norm=raw_norm,
            sent_norm=raw_norm,
            # the injector's knowledge, for accounting only (the coordinator checks values)
            corrupted=effect.corrupted,
            sampler_pos={"epoch": int(pos["epoch"]), "pos": int(pos["pos"])},
            # this worker's batch statistics (only a model with floating buffers has any)
            buffers=self.buffers.read(self.model),
        )
        if self.compressor is not None:
            g = gbuf.numpy()
            payload: Payload = (
                self.ef.step(g, self.rng)
                if self.ef is not None
                else self.compressor.compress(g, self.rng)
            )
            reply.payload = payload
            reply.sent_norm = float(np.linalg.norm(payload.decode()))
            if self.ef is not None and req.want_residual:
                reply.residual = self.ef.memory.copy()
        elif shm_out:
            reply.grad_in_slot = True
        else:
            reply.grad = to_wire(gbuf, self.spec.transfer_dtype)
        reply.compute_s = time.perf_counter() - t_call - (delay_s if stream else 0.0)
        reply.delay_s = delay_s
        if delay_s > 0 and not stream:
            time.sleep(delay_s)
        return reply

    def sampler_state(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def reset_sampler(self, state: dict[str, Any]) -> None:
        """Rewind the sampler (a restarted coordinator resumes from its checkpoint)."""
        self.batches.restart(ShardSampler.from_state(state))

    def set_buffers(self, buffers: np.ndarray) -> None:
        """Start again from the job's averaged buffers (a restored checkpoint's)."""
        self.buffers.write(self.model, buffers)

    def reshard(self, shard: list[int]) -> None:
        self.sampler.reshard(np.asarray(shard, dtype=np.int64))
        self.batches.restart()


# max_concurrency: the pipe-serving loop occupies one thread; ping/info/exit need others
@ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=4)  # type: ignore[call-overload]
class Worker(WorkerCore):
    """The Ray actor around :class:`WorkerCore` (methods are called by the coordinator).

    Args:
        init: as for :class:`WorkerCore`.
    """

    def ping(self) -> int:
        return self.id

    def serve_pipe(self, req_path: str, rep_path: str) -> int:
        """Serve :meth:`compute` requests over the same-host channel until told to stop."""
        return serve(req_path, rep_path, self.compute, self._bind_emit)

    def exit(self) -> None:
        ray.actor.exit_actor()
