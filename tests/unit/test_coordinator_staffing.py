"""Unit tests for actors/coordinator/staffing.py (no Ray): losing a worker (the mode is told,
the job fails below min_workers, a fatal loss fails it whatever the count), nobody started
while the job winds down, and a resize (the highest ids retired and told to training, new
ids started in the background).

The membership, reporter and recovery are the real ones; training and the data plane are
fakes at the seams (they would start actors and open shared memory)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pytest
import ray

from actors.coordinator.dataplane import DataPlane
from actors.coordinator.faulting import Loss
from actors.coordinator.membership import Membership
from actors.coordinator.recovery import Recovery
from actors.coordinator.reporting import Reporter
from actors.coordinator.slot import WorkerSlot
from actors.coordinator.staffing import Life, Staffing
from actors.coordinator.training import Training
from core.spec import parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


@dataclass
class FakeTraining:
    """What staffing calls on training, recorded."""

    left: list[int] = field(default_factory=list)
    applied: int = 0

    def leave(self, w: WorkerSlot) -> list[int]:
        self.left.append(w.id)
        return [7] if w.id == 0 else []

    def apply_ready(self) -> None:
        self.applied += 1


@dataclass
class Loop:
    """The loop's side of :class:`Life`."""

    ended: bool = False
    winding_down: bool = False
    failed: list[str] = field(default_factory=list)
    wakes: int = 0

    def life(self) -> Life:
        def wake() -> None:
            self.wakes += 1

        return Life(
            winding_down=lambda: self.winding_down or self.ended,
            ended=lambda: self.ended,
            fail=self.failed.append,
            wake=wake,
        )


def _staff(n: int = 3, min_workers: int = 2) -> tuple[Staffing, FakeTraining, Loop, Reporter]:
    spec = parse_spec({"steps": 10, "workers": n, "min_workers": min_workers, "max_workers": 6})
    reporter = Reporter(0.0, None, lambda: 0)
    members = Membership("job1", spec, reporter, 60)
    members.cut_shards(list(range(n)))
    for wid in range(n):
        members.workers[wid] = WorkerSlot(
            id=wid, actor=None, state="idle", shard=members.shards[wid]
        )
    train, loop = FakeTraining(), Loop()
    parts = (cast(DataPlane, None), Recovery(None, spec.checkpoint), reporter)
    staff = Staffing(spec, members, cast(Training, train), parts, loop.life())
    return staff, train, loop, reporter


def _details(reporter: Reporter) -> list[str]:
    return [e.detail for e in reporter.events]


def test_a_lost_worker_leaves_the_mode_and_a_replacement_is_queued() -> None:
    staff, train, loop, reporter = _staff()
    staff.lose(staff.members.workers[0], "no reply for 5.0 s")
    assert train.left == [0] and train.applied == 1 and loop.wakes == 1
    assert staff.members.workers[0].state == "dead"
    assert [wid for _, wid in staff.members.pending_joins] == [0]
    assert "no reply for 5.0 s; left steps [7]" in _details(reporter)
    assert loop.failed == []
    staff.lose(staff.members.workers[0], "again")  # already gone: nothing happens
    assert train.left == [0]


def test_below_min_workers_the_job_fails_naming_the_last_loss() -> None:
    staff, _, loop, _ = _staff(n=2, min_workers=2)
    staff.lose(staff.members.workers[1], "worker lost: ActorDiedError")
    (why,) = loop.failed
    assert why.startswith("1 live workers < min_workers=2") and "ActorDiedError" in why


def test_a_fatal_loss_fails_the_job_whatever_the_count() -> None:
    staff, train, loop, _ = _staff(n=3, min_workers=1)
    staff.apply_loss(Loss(staff.members.workers[2], "raised", fatal="the task raised 3 times"))
    assert loop.failed == ["the task raised 3 times"] and train.left == [2]
    loop.ended = True  # a job that has ended is not failed again, nor are updates applied
    staff.apply_loss(Loss(staff.members.workers[1], "raised", fatal="again"))
    assert loop.failed == ["the task raised 3 times"] and train.applied == 1


def test_nobody_is_started_while_the_job_winds_down() -> None:
    staff, _, loop, reporter = _staff()
    staff.members.workers[1].state = "dead"
    loop.winding_down = True
    staff.start_join(1)
    assert staff.members.workers[1].state == "dead" and _details(reporter) == []


def test_a_resize_retires_the_highest_ids_and_starts_new_ones() -> None:
    staff, train, loop, reporter = _staff(n=3)
    started: list[tuple[int, np.ndarray]] = []

    async def add(wid: int, shard: np.ndarray, *_: Any, **__: Any) -> WorkerSlot | None:
        started.append((wid, shard))
        return None

    staff.add = add  # type: ignore[method-assign]  # would create an actor
    had_ray = ray.is_initialized()  # the suite's integration tests may have connected it

    async def grow_then_shrink() -> None:
        staff.resize(5)
        await asyncio.sleep(0)  # the background joins run
        staff.members.workers[3].state = staff.members.workers[4].state = "idle"
        staff.resize(2)

    asyncio.run(grow_then_shrink())
    assert [wid for wid, _ in started] == [3, 4]
    assert sorted(train.left) == [2, 3, 4]
    assert [staff.members.workers[w].state for w in range(5)] == ["idle"] * 2 + ["left"] * 3
    assert "scale requested: 3 -> 5 workers" in _details(reporter)
    assert "scale requested: 5 -> 2 workers" in _details(reporter)
    assert loop.wakes >= 2
    assert ray.is_initialized() == had_ray  # a placeholder's retirement starts no Ray


def test_a_worker_that_failed_to_start_is_started_once_more() -> None:
    """Start-up left worker 1 dead (its actor died before answering) and the others up:
    it is queued to start again, like a lost worker; the live ones are left alone."""
    staff, _, loop, _ = _staff(n=3, min_workers=1)
    staff.members.workers[1].state = "dead"
    staff.replace_unstarted([0, 1, 2])
    assert [wid for _, wid in staff.members.pending_joins] == [1]
    assert loop.failed == []
