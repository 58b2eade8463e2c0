"""Unit tests for actors/coordinator/dataplane.py (no Ray): gradients decoded from each way a
reply carries them, shared-memory views (the model of record in place, identical views
shared and reference-counted, released when the model changes), and requests that carry a
pending reshard and plan exactly once. Shared memory lives in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import actors.transport as transport
from actors.compression import make_compressor
from actors.coordinator.dataplane import DataPlane
from actors.coordinator.slot import WorkerSlot
from actors.faults import bind_plan
from actors.messages import GradientReply
from actors.modes.base import Dispatch
from actors.transport import to_wire
from core.spec import CompressionSpec, FaultSpec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

DIM = 6


@pytest.fixture
def plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataPlane:
    monkeypatch.setattr(transport, "SHM_ROOT", tmp_path)
    spec = parse_spec({"steps": 5, "workers": 2, "transfer_dtype": "bfloat16"})
    return DataPlane("unit", spec, DIM)


def _reply(**kw: object) -> GradientReply:
    return GradientReply(0, 0, 1.0, 32, 1.0, 1.0, **kw)  # type: ignore[arg-type]


def test_decodes_wire_arrays_payloads_and_slots(plane: DataPlane) -> None:
    g = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 4.0])
    wire = plane.decode(WorkerSlot(0, None), _reply(grad=to_wire(g, "bfloat16")))
    assert torch.allclose(wire, g)  # these values are exact in bfloat16
    topk = make_compressor(CompressionSpec(name="topk", fraction=0.5), DIM)
    payload = topk.compress(g.numpy(), np.random.default_rng(0))
    dec = plane.decode(WorkerSlot(0, None), _reply(payload=payload))
    assert torch.equal(dec, torch.tensor([0.0, -2.0, 0.0, 0.0, 3.0, 4.0]))
    plane.open(torch.zeros(DIM), share_model=False)
    assert plane.shm is not None
    plane.shm.grad_slot(1)
    plane.shm.grad(1).copy_(g)
    assert torch.equal(plane.decode(WorkerSlot(1, None), _reply(grad_in_slot=True)), g)


def test_the_model_of_record_is_handed_out_in_place(plane: DataPlane) -> None:
    x = plane.open(torch.arange(DIM, dtype=torch.float32), share_model=True)
    assert plane.x_ref is not None and torch.equal(x, torch.arange(DIM, dtype=torch.float32))
    w = WorkerSlot(0, None, shm=True)
    assert plane.publish(w, ("x", 0), x) == plane.x_ref and w.view_slot is None


def test_identical_views_share_one_slot_until_the_model_changes(plane: DataPlane) -> None:
    plane.open(torch.zeros(DIM), share_model=False)
    shm = plane.shm
    assert shm is not None
    a, b = WorkerSlot(0, None, shm=True), WorkerSlot(1, None, shm=True)
    v = torch.full((DIM,), 2.0)
    ref_a = plane.publish(a, ("p", 0, ()), v)
    ref_b = plane.publish(b, ("p", 0, ()), v)
    assert ref_a == ref_b and a.view_slot == b.view_slot is not None
    slot = a.view_slot
    assert slot is not None
    assert torch.equal(shm.view(slot), v)
    plane.release_view(a)
    plane.release_view(b)
    assert slot not in shm._free  # the cache still holds it
    plane.invalidate()
    assert slot in shm._free and not plane.view_cache


def test_a_request_carries_reshard_and_plan_once(plane: DataPlane) -> None:
    plane.open(torch.zeros(DIM), share_model=False)
    w = WorkerSlot(0, None, shm=True, reshard=[3, 1, 2], send_plan=True)
    plan = bind_plan([FaultSpec(kind="delay", delay_ms=5.0)], [0, 1], seed=0)
    d = Dispatch(worker=0, step=4, key=("x", 4), view=torch.zeros(DIM))
    req = plane.request(w, d, want_residual=True, local_steps=3, plan=plan)
    assert (req.step, req.want_residual, req.local_steps) == (4, True, 3)
    assert req.reshard == [3, 1, 2] and req.faults == plan
    again = plane.request(w, d, want_residual=False, local_steps=3, plan=plan)
    assert again.reshard is None and again.faults is None
