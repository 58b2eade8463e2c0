"""The live streams' broadcaster (api.streams) on a real store, without HTTP or Ray.

One feed per job whatever the number of subscribers; each subscriber gets every record and
event after its cursor exactly once and in order, caught up from the store and then live;
a subscriber that stops reading is dropped while the others go on; the cap on streams.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from api.streams import (
    Chunk,
    Cursor,
    EndItem,
    EventItem,
    FeedItem,
    InvalidCursor,
    JobItem,
    MetricItem,
    Pairs,
    StreamHub,
    Subscription,
    TooManyStreams,
    _new_to,
    _Position,
    sse_bytes,
)
from core.events import Event, EventKind, StepRecord
from core.state import JobState
from service.store import Store, new_id

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

T = TypeVar("T")
POLL_S = 0.01


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db.sqlite3")
    yield s
    s.close()


def make_job(store: Store, state: str = "running") -> str:
    job_id = new_id()
    store.create_job(job_id, "s", {"name": "s"}, Path("/tmp") / job_id, state=state)
    return job_id


def step(seq: int) -> StepRecord:
    return StepRecord(
        seq=seq,
        step=seq,
        time_s=0.01 * seq,
        wall_time=1e9 + seq,
        loss=1.0 / seq,
        samples_per_s=100.0,
        samples=32 * seq,
        b_hat=0.1,
        b_hat_max=0.2,
        bound=1.0,
        workers=2,
    )


def event(seq: int) -> Event:
    return Event(seq, 1e9 + seq, 0.0, seq, EventKind.CHECKPOINT, f"checkpoint {seq}")


async def ingest(store: Store, job_id: str, seqs: range, events: bool = False) -> None:
    evs = [event(s) for s in seqs] if events else []
    await asyncio.to_thread(store.ingest, job_id, [step(s) for s in seqs], evs)


async def collect(
    sub: Subscription, cursor: Cursor, *, until_seq: int | None = None
) -> list[tuple[FeedItem, Cursor]]:
    got: list[tuple[FeedItem, Cursor]] = []
    async for item, after in sub.items(cursor):
        got.append((item, after))
        if until_seq is not None and isinstance(item, MetricItem) and item.seq >= until_seq:
            break
    return got


def seqs_of(got: list[tuple[FeedItem, Cursor]]) -> list[int]:
    return [i.seq for i, _ in got if isinstance(i, MetricItem)]


async def finish(store: Store, job_id: str) -> None:
    await asyncio.to_thread(lambda: store.transition(job_id, "running", "succeeded", detail="done"))


def test_cursor_text_round_trip_and_refusals() -> None:
    c = Cursor(4711, 322)
    assert c.text() == "4711:322" and Cursor.parse(c.text()) == c
    assert Cursor.parse("-1:0") == Cursor()
    for bad in ("", "4711", "a:b", "-2:0", "1:-1", "1:2:3", "9" * 16 + ":0"):
        with pytest.raises(InvalidCursor, match="Last-Event-ID"):
            Cursor.parse(bad)


def test_subscribers_share_one_feed_and_each_gets_everything_once(store: Store) -> None:
    job_id = make_job(store)
    store.ingest(job_id, [step(s) for s in range(1, 11)], [])

    async def main() -> tuple[list[Any], list[Any], int]:
        hub = StreamHub(store, max_subscribers=10, poll_s=POLL_S)
        a = await hub.subscribe(job_id)
        b = await hub.subscribe(job_id)
        assert list(hub.feeds()) == [job_id] and hub.open == 2
        # the feed queues these before the subscribers read: their catch-up has them too
        await ingest(store, job_id, range(11, 61), events=True)
        await asyncio.sleep(5 * POLL_S)
        # one chunk per read of the feed (a read takes a page of each: 50 records, 50 events)
        queued = [[c.pairs for c in s.queue._queue] for s in (a, b)]  # type: ignore[attr-defined]
        assert all(sum(len(p) for p in q) >= 100 for q in queued), queued
        # a from the start, b from the middle; records arrive while both follow
        ta = asyncio.create_task(collect(a, Cursor()))
        tb = asyncio.create_task(collect(b, Cursor(5, 0)))
        for lo in range(61, 611, 50):
            await ingest(store, job_id, range(lo, lo + 50), events=lo == 311)
            await asyncio.sleep(POLL_S)
        await finish(store, job_id)
        got_a, got_b = await ta, await tb
        a.close()
        b.close()
        return got_a, got_b, hub.open

    got_a, got_b, still_open = run(main())
    assert seqs_of(got_a) == list(range(1, 611))
    assert seqs_of(got_b) == list(range(6, 611))
    for got in (got_a, got_b):
        assert isinstance(got[0][0], JobItem) and json.loads(got[0][0].payload)["id"] == job_id
        end, last = got[-1]
        assert isinstance(end, EndItem) and end.state == "succeeded"
        event_ids = [i.event_id for i, _ in got if isinstance(i, EventItem)]
        assert event_ids == sorted(set(event_ids)) and event_ids[-1] == last.after_id
        assert len(event_ids) >= 100  # 50 + 50 checkpoints, the final state
        assert last.after_seq == 610
        # the job states sent never go back
        versions = [i.version for i, _ in got if isinstance(i, JobItem)]
        assert versions == sorted(set(versions))
    assert still_open == 0


def test_resume_from_a_cursor_sends_only_what_is_after_it(store: Store) -> None:
    job_id = make_job(store)
    store.ingest(job_id, [step(s) for s in range(1, 1201)], [event(s) for s in (3, 700)])
    store.transition(job_id, "running", "succeeded", detail="done")
    first_event = store.events(job_id)[0].id

    async def main(cursor: Cursor) -> list[tuple[FeedItem, Cursor]]:
        hub = StreamHub(store, max_subscribers=1, poll_s=POLL_S)
        sub = await hub.subscribe(job_id)
        try:
            return await collect(sub, cursor)
        finally:
            sub.close()

    # past the first page of the catch-up (500 records)
    got = run(main(Cursor(1000, first_event)))
    assert seqs_of(got) == list(range(1001, 1201))
    events = [i.event_id for i, _ in got if isinstance(i, EventItem)]
    assert all(e > first_event for e in events) and len(events) >= 2  # 700, succeeded
    assert isinstance(got[-1][0], EndItem)
    whole = run(main(Cursor()))
    assert seqs_of(whole) == list(range(1, 1201))


def test_a_subscriber_that_stops_reading_is_dropped_and_the_others_go_on(
    store: Store,
) -> None:
    job_id = make_job(store)

    async def main() -> tuple[list[Any], list[Any], int, int]:
        hub = StreamHub(store, max_subscribers=10, poll_s=POLL_S, queue_chunks=8)
        slow = await hub.subscribe(job_id)
        fast = await hub.subscribe(job_id)
        slow_items = slow.items(Cursor())
        first = await anext(slow_items)  # the job's state; then it reads no more
        t_fast = asyncio.create_task(collect(fast, Cursor(), until_seq=200))
        for lo in range(1, 201, 5):
            await ingest(store, job_id, range(lo, lo + 5))
            await asyncio.sleep(2 * POLL_S)
        got_fast = await t_fast
        # the slow one still gets what it lacks from the store, then its stream ends
        rest = [item async for item in slow_items]
        fast.close()
        slow.close()
        return [first, *rest], got_fast, hub.dropped, hub.open

    got_slow, got_fast, dropped, still_open = run(main())
    assert dropped == 1 and still_open == 0
    assert seqs_of(got_fast) == list(range(1, 201))
    assert not any(isinstance(i, EndItem) for i, _ in got_slow)  # ended without an 'end'


def test_the_cap_on_streams_and_the_feed_stopping_with_its_last_subscriber(
    store: Store,
) -> None:
    job_a, job_b = make_job(store), make_job(store)

    async def main() -> None:
        hub = StreamHub(store, max_subscribers=2, poll_s=POLL_S)
        a = await hub.subscribe(job_a)
        b = await hub.subscribe(job_b)
        assert set(hub.feeds()) == {job_a, job_b}
        with pytest.raises(TooManyStreams, match="ESGD_MAX_STREAM_SUBSCRIBERS") as refused:
            await hub.subscribe(job_a)
        assert "2 streams are open" in str(refused.value)
        feed_a = hub.feeds()[job_a]
        a.close()
        a.close()  # idempotent
        assert hub.open == 1 and set(hub.feeds()) == {job_b}
        await asyncio.sleep(5 * POLL_S)
        assert feed_a.task is not None and feed_a.task.done()  # no reader left behind
        again = await hub.subscribe(job_a)  # a slot is free again: a new feed
        assert hub.feeds()[job_a] is not feed_a
        await hub.close()
        assert hub.feeds() == {}
        again.close()
        b.close()
        assert hub.open == 0

    run(main())


def test_a_finished_job_streams_its_history_and_ends_at_once(store: Store) -> None:
    job_id = make_job(store, state="succeeded")
    store.ingest(job_id, [step(s) for s in range(1, 4)], [])

    async def main() -> list[tuple[FeedItem, Cursor]]:
        hub = StreamHub(store, max_subscribers=1, poll_s=POLL_S)
        sub = await hub.subscribe(job_id)
        got = await collect(sub, Cursor())
        sub.close()
        assert hub.feeds() == {}
        return got

    got = run(main())
    assert [type(i).__name__ for i, _ in got] == [
        "JobItem",
        "MetricItem",
        "MetricItem",
        "MetricItem",
        "EventItem",  # the job's 'state' event at its creation
        "EndItem",
    ]


class FailingStore(Store):
    """The real store whose reads of new records can be told to fail (a broken disk)."""

    fail = False

    def metrics(self, job_id: str, **kw: Any) -> list[dict[str, Any]]:
        if self.fail:
            raise sqlite3.OperationalError("disk I/O error")
        return super().metrics(job_id, **kw)


def test_when_the_feed_cannot_read_its_streams_end_and_a_new_one_starts_over(
    tmp_path: Path,
) -> None:
    store = FailingStore(tmp_path / "db.sqlite3")
    job_id = make_job(store)

    async def main() -> list[tuple[FeedItem, Cursor]]:
        hub = StreamHub(store, max_subscribers=2, poll_s=POLL_S)
        sub = await hub.subscribe(job_id)
        task = asyncio.create_task(collect(sub, Cursor()))
        await asyncio.sleep(5 * POLL_S)
        store.fail = True
        got = await task  # ends (without an 'end'): no stream waits for ever
        sub.close()
        assert hub.feeds() == {} and hub.open == 0
        store.fail = False
        again = await hub.subscribe(job_id)  # a new feed
        assert job_id in hub.feeds()
        again.close()
        return got

    try:
        got = run(main())
    finally:
        store.close()
    assert [type(i).__name__ for i, _ in got] == ["JobItem", "EventItem"]


def test_a_live_stream_writes_what_queued_up_in_one_chunk_of_sse_messages(store: Store) -> None:
    """Chunks: 200 records queued while the reader was away come out in one chunk (one
    write), as one ``metrics`` message (a JSON array, in order) whose id is the cursor
    after the last record."""
    job_id = make_job(store)

    async def main() -> list[tuple[Pairs, bytes]]:
        hub = StreamHub(store, max_subscribers=4, poll_s=POLL_S)
        sub = await hub.subscribe(job_id)
        chunks = sub.chunks(Cursor())
        first = await anext(chunks)  # the catch-up: the job's row
        await ingest(store, job_id, range(1, 201))
        await asyncio.sleep(10 * POLL_S)  # the feed queues them all meanwhile
        second = await anext(chunks)
        sub.close()
        return [first, second]

    first, (pairs, wire_bytes) = run(main())
    assert isinstance(first[0][0][0], JobItem)  # the catch-up: the row (and its first event)
    metrics = [(i, c) for i, c in pairs if isinstance(i, MetricItem)]
    assert [i.seq for i, _ in metrics] == list(range(1, 201))  # one chunk, in order
    wire = wire_bytes.decode()
    assert wire == sse_bytes(pairs).decode() and wire.endswith("\n\n")
    assert wire.count("event: metrics\n") == 1 and "event: metric\n" not in wire
    after_id = metrics[0][1].after_id  # the event the catch-up already gave
    assert f"id: 200:{after_id}\n" in wire
    data = next(line for line in wire.splitlines() if line.startswith("data: ["))
    assert [r["seq"] for r in json.loads(data.removeprefix("data: "))] == list(range(1, 201))


def test_caught_up_subscribers_share_the_feeds_rendered_bytes(store: Store) -> None:
    """A feed chunk is rendered once: every subscriber that was where it starts writes the
    same bytes object, one that caught up from the store in between included."""
    job_id = make_job(store)

    async def main() -> tuple[list[bytes], list[bytes], list[int]]:
        hub = StreamHub(store, max_subscribers=4, poll_s=POLL_S)
        a, b = await hub.subscribe(job_id), await hub.subscribe(job_id)
        ca, cb = a.chunks(Cursor()), b.chunks(Cursor())
        await anext(ca), await anext(cb)  # caught up: the row and the first event
        await ingest(store, job_id, range(1, 51))
        (_, wa), (_, wb) = await anext(ca), await anext(cb)
        # a third one from record 30 reads 31..50 from the store, then takes the feed's
        c = await hub.subscribe(job_id)
        cc = c.chunks(Cursor(30, 0))
        caught, _ = await anext(cc)
        await ingest(store, job_id, range(51, 81))
        (_, wa2), (_, wb2), (live, wc) = await anext(ca), await anext(cb), await anext(cc)
        for sub in (a, b, c):
            sub.close()
        seqs = [i.seq for i, _ in [*caught, *live] if isinstance(i, MetricItem)]
        return [wa, wb], [wa2, wb2, wc], seqs

    first, second, seqs_c = run(main())
    assert first[0] is first[1] and second[0] is second[1] is second[2]  # one rendering
    assert seqs_c == list(range(31, 81))


def test_a_subscriber_inside_a_chunk_gets_only_the_rest_rendered_for_it() -> None:
    """Pure: a subscriber whose catch-up read past the feed's cursor takes, of the feed's
    next chunk, only what it lacks, rendered for it (the shared bytes would repeat some)."""
    before = Cursor(50, 1)
    pairs: Pairs = [(MetricItem(q, f'{{"seq":{q}}}'), Cursor(q, 1)) for q in range(51, 81)]
    chunk = Chunk(before, pairs)
    inside = _Position(Cursor(60, 1))
    out, wire, ended = _new_to(inside, [chunk])
    assert [i.seq for i, _ in out] == list(range(61, 81)) and not ended  # type: ignore[union-attr]
    assert wire.decode().startswith('event: metrics\ndata: [{"seq":61},')
    assert wire.decode().endswith('{"seq":80}]\nid: 80:1\n\n')
    at_start = _Position(before)
    out2, wire2, _ = _new_to(at_start, [chunk])
    assert wire2 is chunk.wire() and len(out2) == 30 and at_start.cursor == Cursor(80, 1)


def test_sse_bytes_groups_each_run_of_records_into_one_metrics_message() -> None:
    c = Cursor
    m1, m2 = MetricItem(1, '{"seq":1}'), MetricItem(2, '{"seq":2}')
    ev = EventItem(7, '{"id":7}')
    end = EndItem(JobState.SUCCEEDED)
    wire = sse_bytes([(m1, c(1, 0)), (ev, c(1, 7)), (m2, c(2, 7)), (end, c(2, 7))])
    assert wire.decode() == (
        'event: metrics\ndata: [{"seq":1}]\nid: 1:0\n\n'
        'event: event\ndata: {"id":7}\nid: 1:7\n\n'
        'event: metrics\ndata: [{"seq":2}]\nid: 2:7\n\n'
        'event: end\ndata: {"state": "succeeded"}\n\n'
    )
