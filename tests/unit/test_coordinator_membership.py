"""Unit tests for actors/coordinator/membership.py (no Ray): who is live, resize plans
(who leaves, which ids are new, every shard re-cut), losing a worker (replacement queued or
not), the join queue, and a rejoining worker's sampler continuation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from actors.coordinator.membership import Membership
from actors.coordinator.reporting import Reporter
from actors.coordinator.slot import WorkerSlot
from core.spec import parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

N_TRAIN = 120


def _members(n: int = 4, **spec: Any) -> Membership:
    s = parse_spec({"steps": 10, "workers": n, "max_workers": 8, **spec})
    m = Membership("job1", s, Reporter(0.0, None, lambda: 0), N_TRAIN)
    m.cut_shards(list(range(n)))
    for wid in range(n):
        m.workers[wid] = WorkerSlot(id=wid, actor=None, state="idle", shard=m.shards[wid])
    return m


def test_live_and_ready_skip_the_gone_and_the_starting() -> None:
    m = _members()
    m.workers[1].state = "dead"
    m.workers[2].state = "starting"
    assert [w.id for w in m.live()] == [0, 2, 3]
    assert [w.id for w in m.ready()] == [0, 3]
    assert m.members() == {0: 0, 3: 0}


def test_shards_partition_the_training_set() -> None:
    m = _members()
    rows = np.concatenate([m.shards[w] for w in range(4)])
    assert sorted(rows.tolist()) == list(range(N_TRAIN))


def test_shrinking_retires_the_highest_ids_and_recuts_the_rest() -> None:
    m = _members()
    before = {w: m.shards[w].copy() for w in range(4)}
    plan = m.plan_resize(2)
    assert [w.id for w in plan.retire] == [2, 3] and plan.start == []
    assert m.resizes == 1
    kept = np.concatenate([m.shards[0], m.shards[1]])
    assert sorted(kept.tolist()) == list(range(N_TRAIN))  # the two keep all the data
    for w in (0, 1):
        assert m.workers[w].reshard == m.shards[w].tolist()
        assert not np.array_equal(m.shards[w], before[w])


def test_growing_starts_new_ids_after_the_highest_ever_used() -> None:
    m = _members()
    m.workers[3].state = "dead"  # id 3 stays taken: a new worker never reuses it
    plan = m.plan_resize(5)
    assert plan.retire == [] and plan.start == [4, 5]
    assert set(m.shards) >= {0, 1, 2, 4, 5}


def test_a_lost_worker_is_replaced_unless_told_otherwise() -> None:
    m = _members()
    m.mark_lost(m.workers[0], keep_actor=False)
    assert m.workers[0].state == "dead" and m.workers[0].lost_at is not None
    assert [wid for _, wid in m.pending_joins] == [0]
    m.mark_lost(m.workers[1], keep_actor=True)  # partitioned: it may come back itself
    assert [wid for _, wid in m.pending_joins] == [0]
    assert [r.kind for r in m.reporter.recoveries] == ["lost", "lost"]

    no_replace = _members(replace_lost_workers=False)
    no_replace.mark_lost(no_replace.workers[0], keep_actor=False)
    assert no_replace.pending_joins == []


def test_due_joins_leave_the_future_ones_queued() -> None:
    m = _members()
    m.pending_joins = [(10.0, 1), (20.0, 2)]
    assert m.due_joins(15.0) == [1]
    assert m.pending_joins == [(20.0, 2)]


def test_a_rejoining_worker_continues_its_sampler() -> None:
    m = _members()
    old = m.workers[2]
    old.state, old.gen, old.sampler = "dead", 3, {"epoch": 1, "pos": 7}
    prev, shard, sampler = m.placeholder(2)
    assert prev is old
    assert m.workers[2].state == "starting" and m.workers[2].gen == 4
    assert np.array_equal(shard, m.shards[2])
    assert sampler == {"epoch": 1, "pos": 7, "seed": 0, "shard_key": 2, "shard": shard.tolist()}


def test_public_view_names_the_transport() -> None:
    w = WorkerSlot(id=5, actor=None, state="busy", shm=True, last_step=3)
    pub = w.public()
    assert pub["transport"] == "shared_memory" and pub["step"] == 3 and pub["state"] == "busy"
