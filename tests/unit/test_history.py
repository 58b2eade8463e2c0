"""A job's history for charts (Store.metric_history and friends) on a real SQLite store.

Short kinds come whole; long ones are thinned to at most ``max_points``: the first record
of each equal span of ``seq`` and the last one, in seq order, with nothing of other jobs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.events import EvalRecord, Event, EventKind, Record, StepRecord
from service.store import Store, new_id

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db.sqlite3")
    yield s
    s.close()


def make_job(store: Store) -> str:
    job_id = new_id()
    store.create_job(job_id, "h", {"name": "h"}, Path("/tmp") / job_id, state="succeeded")
    return job_id


def records(steps: int, eval_every: int) -> list[Record]:
    """A run's records as the coordinator numbers them: a step each, an eval every few."""
    out: list[Record] = []
    seq = 0
    for step in range(1, steps + 1):
        seq += 1
        out.append(
            StepRecord(seq, step, 0.01 * step, 1e9 + step, 1.0 / step, 1e3, 32 * step, 0.1, 0.2,
                       1.0, 2)
        )  # fmt: skip
        if step % eval_every == 0:
            seq += 1
            out.append(EvalRecord(seq, step, 0.01 * step, 1e9 + step, 2, {"test_accuracy": 0.9}))
    return out


def test_a_short_history_comes_whole(store: Store) -> None:
    job_id = make_job(store)
    store.ingest(job_id, records(30, 10), [])
    h = store.metric_history(job_id, max_points=30)
    assert set(h) == {"step", "eval"}
    assert [r["step"] for r in h["step"].records] == list(range(1, 31))
    assert [r["step"] for r in h["eval"].records] == [10, 20, 30]
    assert not h["step"].thinned and not h["eval"].thinned
    assert h["step"].records[0]["loss"] == 1.0 and "seq" in h["step"].records[0]
    assert store.metric_history(make_job(store), max_points=10) == {}


def test_a_long_history_is_thinned_evenly_and_keeps_both_ends(store: Store) -> None:
    job_id = make_job(store)
    other = make_job(store)
    store.ingest(job_id, records(20_000, 10), [])
    store.ingest(other, records(50, 10), [])
    h = store.metric_history(job_id, max_points=200)
    for kind in ("step", "eval"):  # 20,000 and 2,000 records
        series = h[kind]
        kept = [r["seq"] for r in series.records]
        assert series.thinned and 150 <= len(kept) <= 200, (kind, len(kept))
        assert kept == sorted(set(kept))
        assert all(r["kind"] == kind for r in series.records)
        steps = [r["step"] for r in series.records]
        assert steps[0] == (1 if kind == "step" else 10) and steps[-1] == 20_000
        # even spans: no gap much wider than 20,000 steps / max_points
        widest = max(b - a for a, b in itertools.pairwise(steps))
        assert widest <= 2 * 20_000 / 200, (kind, widest)
    # the limit holds at its smallest too
    tiny = store.metric_history(job_id, max_points=2)["step"]
    assert [r["step"] for r in tiny.records] == [1, 20_000]
    assert [r["step"] for r in store.metric_history(other, max_points=10)["step"].records][-1] == 50


def test_max_points_below_two_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        store.metric_history(make_job(store), max_points=1)


def test_the_stream_head_and_the_latest_events(store: Store) -> None:
    job_id = make_job(store)
    assert store.stream_head(job_id) == (-1, store.events(job_id)[-1].id)
    events = [Event(s, 1e9, 0.0, s, EventKind.CHECKPOINT, f"c{s}") for s in range(100, 110)]
    store.ingest(job_id, records(40, 10), events)
    seq, event_id = store.stream_head(job_id)
    assert seq == 44 and event_id == store.events(job_id)[-1].id
    latest = store.recent_events(job_id, 3)
    assert [e.detail for e in latest] == ["c107", "c108", "c109"]
    assert len(store.recent_events(job_id, 100)) == 11  # all: the first state event too
