"""Unit tests for actors/coordinator/training.py's per-block receive path (no Ray): a block
announced ahead of its reply reaches the mode only if it is finite.

The :class:`~actors.coordinator.training.Training` is made without its constructor and
given just what ``_on_block`` reads: a worker slot with a request in flight, the slot's
gradient (a stand-in for the shared-memory file), the real model of record, and a mode that
records what it is handed.
"""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from actors.coordinator.training import Training, borrowed_threads
from actors.flat import ParamLayout
from actors.messages import BlockReady
from actors.modes.base import ModelOfRecord
from actors.optim import RecordOptimizer
from core.spec import OptimizerSpec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

BLOCKS = [(0, 2), (2, 3), (3, 6)]


class RecordingMode:
    def __init__(self) -> None:
        self.taken: list[tuple[int, int, float]] = []

    def on_block(
        self, w: Any, step: int, block: int, norm: float, grad: torch.Tensor, loss: float
    ) -> bool:
        del w, norm, grad
        self.taken.append((step, block, loss))
        return True


def _training(grad: torch.Tensor) -> tuple[Training, RecordingMode]:
    t = object.__new__(Training)
    mode = RecordingMode()
    slot = SimpleNamespace(id=0, gen=1, gone=False, partition_until=None)
    t.members = SimpleNamespace(workers={0: slot})  # type: ignore[assignment]
    t.inflight = {0: SimpleNamespace(done=lambda: False)}  # type: ignore[dict-item]
    t.data = SimpleNamespace(shm=SimpleNamespace(grad=lambda _wid: grad))  # type: ignore[assignment]
    # the real model of record (its optimizer's block ranges are what _on_block reads)
    layout = ParamLayout(("a", "b", "c"), ((2,), (1,), (3,)), (0, 2, 3), 6)
    t.record = ModelOfRecord(RecordOptimizer(OptimizerSpec(), torch.zeros(6), layout))
    assert t.record.opt.blocks == BLOCKS
    t.mode = mode  # type: ignore[assignment]
    t.wake = asyncio.Event()
    t.apply_ready = lambda: None  # type: ignore[method-assign]
    return t, mode


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_streamed_block_never_reaches_the_mode(bad: float) -> None:
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0, bad, 6.0])
    t, mode = _training(grad)
    for b in (2, 1, 0):  # backward order: the last block (with the bad entry) first
        t._on_block(0, 1, BlockReady(worker=0, step=5, block=b, norm=1.0, loss=0.3))
    # the finite blocks are taken with the batch's loss; the bad one is left to the
    # reply's whole-gradient screen, which refuses the gradient
    assert mode.taken == [(5, 1, 0.3), (5, 0, 0.3)]
    assert t.wake.is_set()


def test_finite_blocks_all_reach_the_mode() -> None:
    t, mode = _training(torch.arange(6, dtype=torch.float32))
    for b in (2, 1, 0):
        t._on_block(0, 1, BlockReady(worker=0, step=0, block=b, norm=1.0, loss=0.7))
    assert [b for _, b, _ in mode.taken] == [2, 1, 0]


@pytest.mark.parametrize(
    ("own", "near", "per_worker", "cores", "want"),
    [
        (1, 2, 1, 2, 2),  # two waiting workers on a 2-core host: both cores
        (1, 4, 1, 2, 2),  # never past the host's cores
        (1, 0, 1, 8, 1),  # workers elsewhere (object store, other hosts) lend nothing
        (1, 3, 2, 16, 7),  # theirs add up
        (4, 1, 1, 2, 4),  # never fewer than its own
    ],
)
def test_the_apply_borrows_the_cores_of_waiting_workers_on_its_host(
    own: int, near: int, per_worker: int, cores: int, want: int
) -> None:
    assert borrowed_threads(own, near, per_worker, cores) == want


def _training_with(mode_shares: bool, shm: list[bool]) -> Training:
    t = Training.__new__(Training)
    t.own_threads = 1
    t.host_cores = len(os.sched_getaffinity(0))
    t.mode = SimpleNamespace(shares_model_slot=mode_shares)  # type: ignore[assignment]
    t.record = ModelOfRecord(RecordOptimizer(OptimizerSpec(lr=0.1), torch.zeros(6)))
    slots = [SimpleNamespace(shm=s) for s in shm]
    t.members = SimpleNamespace(live=lambda: slots)  # type: ignore[assignment]
    t.spec = SimpleNamespace(resources=SimpleNamespace(torch_threads=1))  # type: ignore[assignment]
    return t


def test_only_a_mode_whose_workers_wait_for_the_update_borrows_their_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    assert _training_with(True, [True, True]).apply_threads() == min(cores, 3)
    # elastic, straggler, async: workers compute while updates are applied
    assert _training_with(False, [True, True]).apply_threads() == 1
    assert _training_with(True, [False, False]).apply_threads() == 1
