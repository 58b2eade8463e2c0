"""Live streams of jobs: one reader of the store per job, shared by all its subscribers.

``GET /jobs/{id}/stream`` (server-sent events) follows a job: its state and progress, its
new metric records and events, then an ``end``. Each stream reading the store on its own
made the cost grow with the number of viewers (100 streams: ``GET /jobs`` from ~6 to
~180 ms median, training from 379 to 94 steps/s). Here a :class:`StreamHub` keeps one
:class:`JobFeed` per followed job: a task that reads what is new for the job once per poll
and puts it, serialised once, on the bounded queue of every subscriber. A subscriber whose
queue is full is dropped (its stream ends; the browser reconnects from where it was), so a
slow reader never slows the feed or the others. The hub admits at most
``max_stream_subscribers`` streams at once (:class:`TooManyStreams` past it: a 429).

A subscriber starts from a :class:`Cursor` (the last metric ``seq`` and event ``id`` it
has: from ``GET /jobs/{id}/history``, or the SSE ``Last-Event-ID`` a reconnecting browser
sends back). It first reads what it lacks up to the present from the store itself, in
pages, then takes the feed's items, skipping those it already has: it registers with the
feed before reading, and the feed publishes everything after the store's head as it was
when the feed started, so nothing falls between the two and nothing comes twice.

On the wire a stream sends what it has in *chunks*: everything queued for it when it gets
to run in one write, the metric records of a chunk as one ``metrics`` message (a JSON array,
its SSE ``id`` the cursor after the last one). A feed publishes what one read found as one
:class:`Chunk` whose bytes are rendered once and written to every subscriber that was
exactly where the chunk starts (all of them, once caught up); only a subscriber in between
has its own part rendered. One write and one message per record cost 100 subscribers of two
jobs at ~290 steps/s about 29,000 writes (and as many messages for the clients to parse) a
second, and most of training's speed (:func:`sse_bytes`, :meth:`Subscription.chunks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi.sse import KEEPALIVE_COMMENT, ServerSentEvent, format_sse_event

from api.schemas import EventPublic, JobPublic, MetricPublic, clean
from core.errors import ElasticSGDError
from core.state import JobState
from service.store import Store

log = logging.getLogger(__name__)

# Records (and, separately, events) per read of the store: a page of the catch-up, or what
# a feed passes on per poll; a running job adds ~190 records per 0.5 s poll at the fastest
# speed measured (379 steps/s), so a feed keeps up in one read per poll.
PAGE = 500
# Feed chunks a subscriber may be behind before it is dropped: 32 = 16 s of 0.5 s polls,
# or 32 full pages (16,000 records); the chunks are shared, a slow subscriber holds only
# references to them.
QUEUE_CHUNKS = 32
# Feed chunks written to a stream at once, at most (live: what queued up while it waited).
WRITE_CHUNKS = 16
# Seconds of silence before a stream sends a keep-alive comment (as FastAPI's SSE does).
PING_S = 15.0
# The text of a Cursor: ``<seq>:<event id>`` (seq -1: no record yet).
CURSOR_PATTERN = r"^(-1|\d{1,15}):(\d{1,15})$"


class InvalidCursor(ElasticSGDError):
    """A stream cursor (``Last-Event-ID``) that this service did not write."""


class TooManyStreams(ElasticSGDError):
    """The service follows as many streams as ``max_stream_subscribers`` allows."""


@dataclass(frozen=True)
class Cursor:
    """Where a subscriber is: the last metric ``seq`` and event ``id`` it has.

    Its text form ``<seq>:<event id>`` is the SSE ``id`` of every metric and event the
    stream sends, so a browser that reconnects sends it back as ``Last-Event-ID``.
    """

    after_seq: int = -1
    after_id: int = 0

    _TEXT = re.compile(CURSOR_PATTERN)

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """The cursor of an SSE id (``Last-Event-ID``).

        Raises:
            InvalidCursor: ``text`` is not ``<seq>:<event id>``.
        """
        m = cls._TEXT.match(text.strip())
        if m is None:
            raise InvalidCursor(
                f"Last-Event-ID {text[:40]!r} is not '<seq>:<event id>' as the stream sends"
                " it: drop the header to start over, or pass after_seq and after_id"
            )
        return cls(int(m.group(1)), int(m.group(2)))

    def text(self) -> str:
        return f"{self.after_seq}:{self.after_id}"


@dataclass(frozen=True)
class JobItem:
    """The job's state and progress (``JobPublic`` without ``updated_at``, as JSON)."""

    version: float  # the row's updated_at: a subscriber never goes back to an older one
    payload: str
    state: JobState


@dataclass(frozen=True)
class MetricItem:
    seq: int
    payload: str  # MetricPublic as JSON


@dataclass(frozen=True)
class EventItem:
    event_id: int
    payload: str  # EventPublic as JSON


@dataclass(frozen=True)
class EndItem:
    """The job is terminal and everything it wrote has been passed on."""

    state: JobState


FeedItem = JobItem | MetricItem | EventItem | EndItem
Pairs = list[tuple[FeedItem, "Cursor"]]


@dataclass
class Chunk:
    """What one read of a feed found, published once to every subscriber: its items with
    the cursor after each, from ``before`` (the feed's cursor when it read) to ``after``;
    its bytes are rendered on first use and shared."""

    before: Cursor
    pairs: Pairs
    _wire: bytes | None = None

    @property
    def after(self) -> Cursor:
        return self.pairs[-1][1] if self.pairs else self.before

    @property
    def job(self) -> JobItem | None:
        first = self.pairs[0][0] if self.pairs else None
        return first if isinstance(first, JobItem) else None

    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = sse_bytes(self.pairs)
        return self._wire


@dataclass(frozen=True)
class Batch:
    """What one read of the store found after a cursor."""

    job: JobItem | None  # None: the job is gone
    metrics: list[MetricItem]
    events: list[EventItem]

    @property
    def full(self) -> bool:
        """A page was full: there may be more right away."""
        return len(self.metrics) >= PAGE or len(self.events) >= PAGE

    @property
    def finished(self) -> bool:
        """The job is terminal and nothing is left to read."""
        return self.job is not None and self.job.state.terminal and not self.full


def read_batch(store: Store, job_id: str, cursor: Cursor) -> Batch:
    """The job's row, then its records and events after ``cursor`` (a page of each),
    serialised for the wire. Blocking: run it in a thread."""
    row = store.get_job(job_id)
    if row is None:
        return Batch(None, [], [])
    # the row first: a terminal state read here means every record was written before it
    recs = store.metrics(job_id, after_seq=cursor.after_seq, limit=PAGE)
    evs = store.events(job_id, after_id=cursor.after_id, limit=PAGE)
    job = JobItem(
        version=row.updated_at,
        payload=JobPublic.of(row).model_dump_json(exclude={"updated_at"}),
        state=JobState(row.state),
    )
    return Batch(
        job,
        [
            MetricItem(int(r["seq"]), MetricPublic.model_validate(clean(r)).model_dump_json())
            for r in recs
        ],
        [EventItem(e.id, EventPublic.of(e).model_dump_json()) for e in evs],
    )


@dataclass
class _Position:
    """What a subscriber has: its cursor, and the last job state it sent (its version)."""

    cursor: Cursor
    version: float = float("-inf")
    job: str = ""

    def take_whole(self, chunk: Chunk) -> bool:
        """True (and move past ``chunk``) when this subscriber is exactly where ``chunk``
        starts and its job state is new: then all of it is new, as it was rendered."""
        job = chunk.job
        if self.cursor != chunk.before:
            return False
        if job is not None and (job.version <= self.version or job.payload == self.job):
            return False
        if job is not None:
            self.version, self.job = job.version, job.payload
        self.cursor = chunk.after
        return True

    def take(self, item: FeedItem) -> bool:
        """True (and move past ``item``) when ``item`` is new to this subscriber."""
        c = self.cursor
        if isinstance(item, JobItem):
            if item.version <= self.version or item.payload == self.job:
                return False
            self.version, self.job = item.version, item.payload
        elif isinstance(item, MetricItem):
            if item.seq <= c.after_seq:
                return False
            self.cursor = Cursor(item.seq, c.after_id)
        elif isinstance(item, EventItem):
            if item.event_id <= c.after_id:
                return False
            self.cursor = Cursor(c.after_seq, item.event_id)
        return True


class _Dropped:
    """Put on a subscriber's queue when it is dropped: its stream ends."""


_DROPPED = _Dropped()


def _new_to(pos: _Position, queued: list[Chunk | _Dropped]) -> tuple[Pairs, bytes, bool]:
    """What of ``queued`` is new to ``pos`` (each item with the cursor after it) and its
    bytes, and whether the stream ends there (an :class:`EndItem`, or the subscriber was
    dropped). A chunk that starts where ``pos`` is goes out as rendered by the feed."""
    out: Pairs = []
    wire: list[bytes] = []
    mine: Pairs = []  # items new to pos from chunks it was not at the start of

    def flush() -> None:
        if mine:
            wire.append(sse_bytes(mine))
            out.extend(mine)
            mine.clear()

    for chunk in queued:
        if isinstance(chunk, _Dropped):
            flush()
            return out, b"".join(wire), True
        if pos.take_whole(chunk):
            flush()
            out.extend(chunk.pairs)
            wire.append(chunk.wire())
        else:
            mine.extend((item, pos.cursor) for item, _ in chunk.pairs if pos.take(item))
        if chunk.pairs and isinstance(chunk.pairs[-1][0], EndItem):
            flush()
            return out, b"".join(wire), True
    flush()
    return out, b"".join(wire), False


class Subscription:
    """One stream's place in the hub: a bounded queue fed by the job's feed.

    Made by :meth:`StreamHub.subscribe`; :meth:`close` it when the stream ends.
    """

    def __init__(self, hub: StreamHub, feed: JobFeed, queue_chunks: int) -> None:
        self.hub, self.feed = hub, feed
        self.queue: asyncio.Queue[Chunk | _Dropped] = asyncio.Queue(queue_chunks)
        self.dropped = False
        self.closed = False

    def offer(self, chunk: Chunk) -> bool:
        """Queue ``chunk``; a full queue drops this subscriber (False)."""
        try:
            self.queue.put_nowait(chunk)
            return True
        except asyncio.QueueFull:
            self.dropped = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(_DROPPED)
            return False

    def end(self) -> None:
        """The feed stopped without an end (the job is gone, or its reads fail)."""
        while self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(_DROPPED)

    async def items(self, cursor: Cursor) -> AsyncIterator[tuple[FeedItem, Cursor]]:
        """Everything after ``cursor``, one item at a time (:meth:`chunks`, flattened)."""
        async for pairs, _ in self.chunks(cursor):
            for pair in pairs:
                yield pair

    async def chunks(self, cursor: Cursor) -> AsyncIterator[tuple[Pairs, bytes]]:
        """Everything after ``cursor``: first caught up from the store (a page per chunk),
        then live (per chunk, what is queued, up to :data:`WRITE_CHUNKS` feed chunks); each
        item with the cursor just after it, and the chunk's SSE bytes. Ends after an
        :class:`EndItem`, or without one when this subscriber is dropped (or the job is
        gone).
        """
        pos = _Position(cursor)
        while True:  # catch up, a page at a time
            batch = await asyncio.to_thread(
                read_batch, self.hub.store, self.feed.job_id, pos.cursor
            )
            if batch.job is None:
                return
            page: list[FeedItem] = [batch.job, *batch.metrics, *batch.events]
            out = [(item, pos.cursor) for item in page if pos.take(item)]
            if out:
                yield out, sse_bytes(out)
            if not batch.full:
                break
        while True:  # live: the feed's chunks, less what the catch-up already gave
            queued = [await self.queue.get()]
            while len(queued) < WRITE_CHUNKS and not self.queue.empty():
                queued.append(self.queue.get_nowait())
            out, wire, ended = _new_to(pos, queued)
            if out:
                yield out, wire
            if ended:
                return

    def close(self) -> None:
        """Leave the feed and free the hub's slot (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.hub._release(self)


@dataclass(eq=False)
class JobFeed:
    """The one reader of a job for all its subscribers (see the module docstring)."""

    hub: StreamHub
    job_id: str
    subscribers: set[Subscription] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: bool = False
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"esgd-feed-{self.job_id}"
        )

    async def _run(self) -> None:
        try:
            head = await asyncio.to_thread(self.hub.store.stream_head, self.job_id)
            cursor = Cursor(*head)
            self.ready.set()
            last_job: str | None = None
            while self.subscribers:
                batch = await asyncio.to_thread(read_batch, self.hub.store, self.job_id, cursor)
                if batch.job is None:
                    break
                chunk = Chunk(cursor, [])
                if batch.job.payload != last_job:
                    last_job = batch.job.payload
                    chunk.pairs.append((batch.job, cursor))
                for m in batch.metrics:
                    cursor = Cursor(m.seq, cursor.after_id)
                    chunk.pairs.append((m, cursor))
                for e in batch.events:
                    cursor = Cursor(cursor.after_seq, e.event_id)
                    chunk.pairs.append((e, cursor))
                if batch.finished:
                    chunk.pairs.append((EndItem(batch.job.state), cursor))
                if chunk.pairs:
                    self._publish(chunk)
                if batch.finished:
                    self.subscribers.clear()
                    break
                if not batch.full:
                    await asyncio.sleep(self.hub.poll_s)
        except Exception:  # the subscribers must not wait forever
            log.exception("the stream feed of job %s failed; its streams end", self.job_id)
        finally:
            self.ready.set()
            self._stop()

    def _publish(self, chunk: Chunk) -> None:
        for sub in list(self.subscribers):
            if not sub.offer(chunk):
                self.subscribers.discard(sub)
                self.hub.dropped += 1
                log.info(
                    "a stream of job %s fell %d chunks behind and was dropped",
                    self.job_id,
                    self.hub.queue_chunks,
                )

    def _stop(self) -> None:
        """No more items: end the streams still attached, and leave the hub."""
        self.stopped = True
        for sub in self.subscribers:
            sub.end()
        self.subscribers.clear()
        self.hub._forget(self)


class StreamHub:
    """The service's live streams: a :class:`JobFeed` per followed job, a cap on streams.

    Used from the event loop only.

    Args:
        store: where jobs, records and events are read.
        max_subscribers: streams open at once, all jobs together (the
            ``max_stream_subscribers`` setting).
        poll_s: seconds between two reads of a caught-up feed (the supervisor's poll
            interval: the store changes no faster).
        queue_chunks: feed chunks a subscriber may be behind before it is dropped.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_subscribers: int,
        poll_s: float,
        queue_chunks: int = QUEUE_CHUNKS,
    ) -> None:
        self.store = store
        self.max_subscribers = max_subscribers
        self.poll_s = poll_s
        self.queue_chunks = queue_chunks
        self.open = 0  # subscriptions not closed yet
        self.dropped = 0  # subscribers dropped for falling behind, since start
        self._feeds: dict[str, JobFeed] = {}

    def feeds(self) -> dict[str, JobFeed]:
        """The live feeds by job id (a copy)."""
        return dict(self._feeds)

    async def subscribe(self, job_id: str) -> Subscription:
        """A subscription to ``job_id``'s feed (started if the job has none).

        Raises:
            TooManyStreams: ``max_subscribers`` streams are open already.
        """
        if self.open >= self.max_subscribers:
            raise TooManyStreams(
                f"{self.open} streams are open, the most that max_stream_subscribers allows "
                f"({self.max_subscribers}): close one, retry later, or raise "
                "ESGD_MAX_STREAM_SUBSCRIBERS"
            )
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = JobFeed(self, job_id)
            feed.start()
        sub = Subscription(self, feed, self.queue_chunks)
        feed.subscribers.add(sub)
        self.open += 1
        try:
            await feed.ready.wait()
        except BaseException:
            sub.close()
            raise
        if feed.stopped:  # it failed before it was ready: the stream ends at once
            sub.end()
        return sub

    def _release(self, sub: Subscription) -> None:
        self.open -= 1
        feed = sub.feed
        feed.subscribers.discard(sub)
        if not feed.subscribers and not feed.stopped:
            # no one left to read for; a new subscriber starts a new feed
            feed.stopped = True
            self._forget(feed)
            if feed.task is not None:
                feed.task.cancel()

    def _forget(self, feed: JobFeed) -> None:
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]

    async def close(self) -> None:
        """Stop every feed (the service shuts down); their streams end."""
        tasks = [f.task for f in self._feeds.values() if f.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


def sse_of(item: JobItem | EventItem | EndItem, cursor: Cursor) -> ServerSentEvent:
    """``item`` on the wire: ``job``, ``event`` (with ``cursor`` as its SSE ``id``),
    ``end`` (records go out in runs: :func:`sse_bytes`). Payloads were serialised once, by
    the feed."""
    if isinstance(item, JobItem):
        return ServerSentEvent(event="job", raw_data=item.payload)
    if isinstance(item, EventItem):
        return ServerSentEvent(event="event", id=cursor.text(), raw_data=item.payload)
    return ServerSentEvent(event="end", data={"state": item.state.value})


def _message(ev: ServerSentEvent) -> bytes:
    data = ev.raw_data if ev.raw_data is not None else json.dumps(ev.data)
    return format_sse_event(data_str=data, event=ev.event, id=ev.id)


def sse_bytes(chunk: Pairs) -> bytes:
    """A chunk of items as SSE messages, ready for one write (see :func:`sse_of`): each run
    of metric records is one ``metrics`` message, a JSON array of them whose ``id`` is the
    cursor after the last."""
    out: list[bytes] = []
    run: list[str] = []
    last = Cursor()

    def flush() -> None:
        if run:
            ev = ServerSentEvent(event="metrics", id=last.text(), raw_data=f"[{','.join(run)}]")
            out.append(_message(ev))
            run.clear()

    for item, cursor in chunk:
        if isinstance(item, MetricItem):
            run.append(item.payload)
            last = cursor
            continue
        flush()
        out.append(_message(sse_of(item, cursor)))
    flush()
    return b"".join(out)


async def sse_stream(
    sub: Subscription, cursor: Cursor, ping_s: float = PING_S
) -> AsyncIterator[bytes]:
    """The bytes of a stream: :meth:`Subscription.chunks` as :func:`sse_bytes`, with a
    keep-alive comment after ``ping_s`` of silence. The chunks are pulled by a task of
    their own, so a timeout never cancels the subscription's generator mid-read."""
    ready: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)

    async def pull() -> None:
        try:
            async for _, wire in sub.chunks(cursor):
                await ready.put(wire)
        finally:
            await ready.put(None)

    task = asyncio.get_running_loop().create_task(pull(), name="esgd-sse-pull")
    try:
        while True:
            try:
                data = await asyncio.wait_for(ready.get(), ping_s)
            except TimeoutError:
                yield KEEPALIVE_COMMENT
                continue
            if data is None:
                break
            yield data
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
