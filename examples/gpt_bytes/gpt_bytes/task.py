"""The elastic-sgd task: a byte-level GPT on the standard library's sources.

The job names it as ``task: {entrypoint: "gpt_bytes.task:build", params: {...}}``; the
params are validated into :class:`GPTParams` (a bad value is refused with its field's path
under ``task.params``). The model is :class:`gpt_bytes.model.GPT`, the data
:class:`gpt_bytes.data.ByteWindows` over the training or validation files (split by file,
fixed), the loss the mean next-byte cross-entropy in nats, and the metrics:

* ``bits_per_byte``: the cross-entropy in bits (loss / ln 2). It is linear in the loss, so
  the runtime's sample-weighted mean over batches is the validation set's value; the
  perplexity per byte is ``2 ** bits_per_byte`` of that mean (the mean of per-batch
  perplexities would not be, which is why it is not a metric).
* ``accuracy``: the share of bytes whose most likely prediction is right.

Optimizer, schedule and clipping are the job's settings, not the task's (see
``configs/gpt_bytes.yaml``: AdamW, warm-up + cosine, clipping by global norm, no weight
decay on biases and LayerNorm weights).
"""

import math
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from actors.tasks.base import Task, TaskContext
from gpt_bytes.data import ByteWindows, CorpusIndex, build_index
from gpt_bytes.model import GPT


class GPTParams(BaseModel):
    """The task's settings (``task.params`` in a job spec); the defaults are the ~7.6M
    parameter model of :mod:`gpt_bytes.model`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_layer: int = Field(default=6, ge=1, le=48)
    n_head: int = Field(default=8, ge=1, le=64)
    n_embd: int = Field(default=320, ge=8, le=4096)
    # bytes of context per sample (each sample is block_size + 1 bytes)
    block_size: int = Field(default=256, ge=4, le=4096)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    # share of the files (by a stable hash of the path) held out for validation
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    # bound the corpus: the first max_files sorted files (the stdlib has ~700), and at most
    # max_bytes per split (the training stream is ~11 MB unbounded)
    max_files: int | None = Field(default=None, ge=2, le=1_000_000)
    max_bytes: int | None = Field(default=None, ge=64, le=10**12)
    # validation windows evaluated (evenly spaced over the validation stream): 32 windows
    # x 256 bytes = 8 KB of text; a forward pass costs ~2 x 7.6M parameters x 8,192 bytes
    # = 125 GFLOP at the defaults, seconds on one CPU core
    max_eval_windows: Annotated[int, Field(ge=1, le=10_000_000)] = 32
    # where each process logs the indices it served and its peak memory (benchmark only)
    read_log_dir: str | None = Field(default=None, max_length=4096)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "GPTParams":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class GPTBytesTask(Task):
    """A byte-level GPT on the standard library's ``.py`` sources (see the module docstring).

    Args:
        params: the validated task params.
    """

    def __init__(self, params: GPTParams) -> None:
        self.params = params

    def build_model(self) -> nn.Module:
        p = self.params
        return GPT(p.n_layer, p.n_head, p.n_embd, p.block_size, p.dropout)

    def index(self, split: str) -> CorpusIndex:
        """The index of the ``train`` or ``val`` split under these params."""
        p = self.params
        return build_index(
            "val" if split == "val" else "train", p.val_fraction, p.max_files, p.max_bytes
        )

    def _windows(self, split: str, ctx: TaskContext, max_windows: int | None) -> ByteWindows:
        log = Path(self.params.read_log_dir) if self.params.read_log_dir else None
        who = "coord" if ctx.worker_id is None else f"w{ctx.worker_id}"
        return ByteWindows(self.index(split), self.params.block_size, max_windows, log, who)

    def train_data(self, ctx: TaskContext) -> ByteWindows:
        return self._windows("train", ctx, None)

    def eval_data(self, ctx: TaskContext) -> ByteWindows:
        return self._windows("val", ctx, self.params.max_eval_windows)

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        """Mean next-byte cross-entropy (nats) of a ``(B, block_size + 1)`` batch."""
        logits = model(batch[:, :-1])
        # float32 cross-entropy even when the forward ran under bfloat16 autocast
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    @torch.no_grad()
    def metrics(self, model: nn.Module, batch: Tensor) -> dict[str, float]:
        logits = model(batch[:, :-1]).float()
        targets = batch[:, 1:]
        nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        accuracy = (logits.argmax(-1) == targets).float().mean()
        return {"bits_per_byte": float(nats) / math.log(2), "accuracy": float(accuracy)}


def build(params: GPTParams) -> GPTBytesTask:
    """The job's entrypoint (``gpt_bytes.task:build``)."""
    return GPTBytesTask(params)
