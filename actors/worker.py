"""The worker actor: a data shard, a model replica and a seeded sampler.

Each call to :meth:`Worker.compute` takes a *view* of the parameters (a shared-memory
handle or an object-store array), draws the next batch of the worker's shard, computes the
gradient on that view and hands it back (into its shared-memory slot, or as an array, or as
a compressed payload with error-feedback memory). The fault plan is consulted on the way:
a delay stalls the reply (crashes, drops and partitions are carried out by the
coordinator, see :mod:`actors.fault_driver`).

The worker uses ``cuda`` when Ray gave it a GPU, the CPU otherwise.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import numpy as np
import ray
import torch
from torch.func import functional_call

from actors.channel import serve
from actors.compression import ErrorFeedback, Payload, make_compressor
from actors.datasets import loss_fn
from actors.faults import ActiveFault, WorkerFaults
from actors.flat import ParamLayout
from actors.models import build_model
from actors.sampler import ShardSampler
from actors.transport import ShmCache, ShmRef, from_wire, host_id, to_wire
from core.spec import JobSpec


class WorkerCore:
    """Everything a worker does, without Ray (so it can be driven in-process too).

    Args:
        worker_id: the worker's id in the job (stable across rejoins).
        spec: the job.
        x_train / y_train: the training set (the worker reads only its shard's rows).
        task, n_features, n_outputs, input_shape: what the dataset is.
        shard: training-set row indices this worker samples from.
        sampler_state: resume the sampler from here (after a restart), else start fresh.
        faults: the job's bound fault plan.
        t0: wall time the job started (fault windows in seconds are relative to it).
        grad_slot: shared-memory slot for gradients, if the worker shares the host.
    """

    def __init__(
        self,
        worker_id: int,
        spec: JobSpec,
        x_train: np.ndarray,
        y_train: np.ndarray,
        task: str,
        n_features: int,
        n_outputs: int,
        input_shape: tuple[int, ...] | None,
        shard: np.ndarray,
        sampler_state: dict[str, Any] | None,
        faults: list[ActiveFault],
        t0: float,
        grad_slot: ShmRef | None,
    ) -> None:
        torch.set_num_threads(spec.resources.torch_threads)
        self.id = worker_id
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.x = torch.from_numpy(np.ascontiguousarray(x_train))
        self.y = torch.from_numpy(np.ascontiguousarray(y_train))
        if self.device.type == "cuda":
            self.x, self.y = self.x.to(self.device), self.y.to(self.device)
        self.loss = loss_fn(task)
        self.model = build_model(spec.model, n_features, n_outputs, input_shape).to(self.device)
        self.layout = ParamLayout.of(self.model)
        if sampler_state is not None:
            self.sampler = ShardSampler.from_state(sampler_state)
        else:
            self.sampler = ShardSampler(np.asarray(shard), seed=spec.seed, shard_key=worker_id)
        self.faults = WorkerFaults(faults, worker_id, spec.seed)
        self.t0 = t0
        self.shm = ShmCache()
        self.grad_slot = grad_slot
        self.local_grad = torch.zeros(self.layout.numel)
        self.compressor = None
        self.ef: ErrorFeedback | None = None
        if spec.compression.name != "none":
            self.compressor = make_compressor(spec.compression, self.layout.numel)
            if spec.compression.error_feedback:
                self.ef = ErrorFeedback(self.compressor, self.layout.numel)
        self.rng = np.random.default_rng([spec.seed, 31337, worker_id])  # fixed salt

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

    def _view(self, view: ShmRef | np.ndarray) -> torch.Tensor:
        if isinstance(view, ShmRef):
            flat = self.shm.get(view)
        else:
            with warnings.catch_warnings():
                # object-store arrays are read-only; we never write to the view
                warnings.simplefilter("ignore", UserWarning)
                flat = from_wire(view, self.spec.transfer_dtype)
        return flat.to(self.device) if self.device.type == "cuda" else flat

    def compute(
        self,
        step: int,
        view: ShmRef | np.ndarray,
        want_residual: bool,
        set_grad_slot: ShmRef | None = None,
        reshard: list[int] | None = None,
        faults: list[ActiveFault] | None = None,
    ) -> dict[str, Any]:
        """One gradient on ``view`` for ``step``; see the module docstring."""
        t_call = time.perf_counter()
        t_s = time.time() - self.t0
        if set_grad_slot is not None:
            self.grad_slot = set_grad_slot
        if reshard is not None:
            self.sampler.reshard(np.asarray(reshard, dtype=np.int64))
        if faults is not None:
            self.faults.faults = faults
        flat = self._view(view)
        idx = torch.from_numpy(self.sampler.next_batch(self.spec.batch_size))
        xb = self.x[idx.to(self.x.device)]
        yb = self.y[idx.to(self.y.device)]
        pieces = self.layout.pieces(flat)
        out = functional_call(self.model, self.layout.params(pieces), (xb,))
        loss = self.loss(out, yb)
        grads = torch.autograd.grad(loss, pieces)
        gbuf = self.local_grad
        shm_out = self.grad_slot is not None and self.compressor is None
        if shm_out:
            assert self.grad_slot is not None
            gbuf = self.shm.get(self.grad_slot)
        if self.device.type == "cuda":
            tmp = torch.empty(self.layout.numel, device=self.device)
            self.layout.write_grads(grads, tmp)
            gbuf.copy_(tmp.cpu())
        else:
            self.layout.write_grads(grads, gbuf)
        raw_norm = float(gbuf.norm())
        result: dict[str, Any] = {
            "worker": self.id,
            "step": step,
            "loss": float(loss.detach()),
            "raw_norm": raw_norm,
            "n": int(idx.numel()),
            "sampler": {
                "epoch": self.sampler.state_dict()["epoch"],
                "pos": self.sampler.state_dict()["pos"],
            },
        }
        if self.compressor is not None:
            g = gbuf.numpy()
            payload: Payload = (
                self.ef.step(g, self.rng)
                if self.ef is not None
                else self.compressor.compress(g, self.rng)
            )
            result["payload"] = payload
            result["sent_norm"] = float(np.linalg.norm(payload.decode()))
            if self.ef is not None and want_residual:
                result["residual"] = self.ef.memory.copy()
        elif shm_out:
            result["grad"] = "shm"
            result["sent_norm"] = raw_norm
        else:
            result["grad"] = to_wire(gbuf, self.spec.transfer_dtype)
            result["sent_norm"] = raw_norm
        result["compute_s"] = time.perf_counter() - t_call
        delay = self.faults.delay_s(step, t_s)
        if delay > 0:
            time.sleep(delay)
        result["delay_s"] = delay
        return result

    def sampler_state(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def reset_sampler(self, state: dict[str, Any]) -> None:
        """Rewind the sampler (a restarted coordinator resumes from its checkpoint)."""
        self.sampler = ShardSampler.from_state(state)

    def reshard(self, shard: list[int]) -> None:
        self.sampler.reshard(np.asarray(shard, dtype=np.int64))


# max_concurrency: the pipe-serving loop occupies one thread; ping/info/exit need others
@ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=4)  # type: ignore[call-overload]
class Worker(WorkerCore):
    """The Ray actor around :class:`WorkerCore` (methods are called by the coordinator)."""

    def ping(self) -> int:
        return self.id

    def serve_pipe(self, req_path: str, rep_path: str) -> int:
        """Serve :meth:`compute` requests over the same-host channel until told to stop."""
        return serve(req_path, rep_path, lambda msg: self.compute(**msg))

    def exit(self) -> None:
        ray.actor.exit_actor()
