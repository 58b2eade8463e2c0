"""Persistence: jobs, specs, events, metrics, checkpoint records and drills in SQLite.

The store is the service's memory. The API reads only from it; the job manager writes what
it learns from each job's coordinator into it. It is built so that a ``kill -9`` of the API
process loses nothing that was acknowledged:

* WAL journal with ``synchronous=FULL``: every write is committed (and synced) before the
  call returns, so before any HTTP response or poll acknowledgement depends on it;
* metrics and runner events carry the coordinator's ``seq`` and are inserted with
  ``INSERT OR IGNORE`` on ``(job_id, seq)``: a poll that is replayed after a crash
  (the coordinator keeps records until the next poll acknowledges them) adds nothing twice;
* a state change and its event are written in one transaction, guarded by the state it
  came from (compare-and-set), so two threads cannot both move a job.

Writes go through one writer thread that commits them in groups (*group commit*): the
writes queued while a commit is syncing run together in the next transaction, each in its
own savepoint (so one refused write rolls back alone), and share one sync of the WAL. A
caller still returns only after its write is committed and synced. Fifty clients submitting
at once then cost a few syncs, not fifty in a row.

Reads use one sqlite3 connection per calling thread (sqlite3 connections must not be shared
across threads mid-transaction); WAL lets them run while the writer commits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from core.errors import ElasticSGDError
from core.events import Event, Record, record_from_dict
from service.public_errors import public_error

log = logging.getLogger(__name__)

# 2: events.fault (the fault kind of a fault, heal, detect or missing-gradient event)
# 3: jobs.error_detail (the full text of a failure: tracebacks; jobs.error is its public,
#    sanitized form, see service.public_errors)
# 4: events.guard (the guard's action of a ``guard`` event: warn, tighten, fail, rollback)
SCHEMA_VERSION = 4
# At most this many queued writes share one transaction (one sync of the WAL).
GROUP_COMMIT_MAX = 128

T = TypeVar("T")
Write = Callable[[sqlite3.Connection], Any]


@dataclass(frozen=True)
class Retention:
    """How much of a job's history the database keeps (docs/deploy.md, "Retention").

    Attributes:
        checkpoint_records: the newest checkpoint rows (and ``checkpoint`` events) kept per
            job; the checkpoint files themselves are the coordinator's (``checkpoint.keep``).
        step_records: step records kept per job at full resolution. Past it, the older
            half is thinned to every second record (repeatedly: the older, the sparser),
            so a job holds at most about this many; evaluation records are never thinned.
    """

    checkpoint_records: int = 1000
    step_records: int = 200_000

    def __post_init__(self) -> None:
        if self.checkpoint_records < 1 or self.step_records < 2:
            raise ValueError("retention keeps at least 1 checkpoint record and 2 step records")


# Thinning is checked after this many new step records of a job (a count per poll would
# cost a scan of the job's records every poll).
_THIN_CHECK_EVERY = 5_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    error TEXT,
    error_detail TEXT,             -- the full text behind error (added in schema 3)
    status_json TEXT,
    summary_json TEXT,
    out_dir TEXT NOT NULL,
    drill_id TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, created_at);
CREATE TABLE IF NOT EXISTS specs (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id),
    spec_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    source TEXT NOT NULL,          -- 'service' (state machine) or 'runner' (coordinator)
    seq INTEGER,                   -- the coordinator's seq; NULL for service events
    wall_time REAL NOT NULL,
    time_s REAL,
    step INTEGER,
    kind TEXT NOT NULL,
    target TEXT,
    detail TEXT NOT NULL DEFAULT '',
    fault TEXT,                    -- a FaultKind value, or NULL (added in schema 2)
    guard TEXT,                    -- a guard event's action, or NULL (added in schema 4)
    UNIQUE (job_id, source, seq)
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, id);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    wall_time REAL,
    loss REAL,
    test_accuracy REAL,
    samples_per_s REAL,
    b_hat REAL,
    data_json TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS metrics_by_step ON metrics(job_id, step);
-- the history's thinning seeks one kind of one job by seq (Store.metric_history)
CREATE INDEX IF NOT EXISTS metrics_by_kind ON metrics(job_id, kind, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    step INTEGER NOT NULL,
    wall_time REAL NOT NULL,
    path TEXT,
    detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS drills (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    spec_json TEXT NOT NULL,
    job_id TEXT,
    report_json TEXT,
    error TEXT
);
"""


class StoreError(ElasticSGDError):
    """The state database cannot be used (wrong schema version, unwritable directory)."""


class StaleState(ElasticSGDError):
    """A compare-and-set state change found the job in another state than expected."""

    def __init__(self, job_id: str, expected: str, actual: str | None) -> None:
        self.job_id, self.expected, self.actual = job_id, expected, actual
        super().__init__(f"job {job_id} is {actual}, not {expected}")

    def __reduce__(self) -> tuple[type[StaleState], tuple[str, str, str | None]]:
        return (StaleState, (self.job_id, self.expected, self.actual))


@dataclass(frozen=True)
class JobRow:
    """One job as stored (the API turns it into ``JobPublic``)."""

    id: str
    name: str
    state: str
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    step: int
    total_steps: int | None
    error: str | None
    status: dict[str, Any]
    summary: dict[str, Any] | None
    out_dir: str
    drill_id: str | None


@dataclass(frozen=True)
class EventRow:
    id: int
    job_id: str
    source: str
    seq: int | None
    wall_time: float
    time_s: float | None
    step: int | None
    kind: str
    target: str | None
    detail: str
    fault: str | None = None
    guard: str | None = None


@dataclass(frozen=True)
class DrillRow:
    id: str
    name: str
    state: str
    created_at: float
    updated_at: float
    spec: dict[str, Any]
    job_id: str | None
    report: dict[str, Any] | None
    error: str | None


@dataclass(frozen=True)
class CheckpointRow:
    job_id: str
    step: int
    wall_time: float
    path: str | None
    detail: str


@dataclass(frozen=True)
class MetricSeries:
    """One kind of a job's metric records, thinned for a chart (see :meth:`Store.metric_history`).

    Args:
        kind: ``step`` or ``eval``.
        records: in seq order, each with its ``seq``.
        thinned: some records were left out (the kind has more than ``max_points``).
    """

    kind: str
    records: list[dict[str, Any]]
    thinned: bool


def new_id() -> str:
    """A short random id: 12 hex digits = 48 bits, collision-free for any realistic count."""
    return uuid.uuid4().hex[:12]


def _num(x: Any) -> float | None:
    """A finite float for an indexed column, or None (NaN/inf stay in the JSON only)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def _int(x: Any, default: int = 0) -> int:
    if isinstance(x, bool):
        return default
    if isinstance(x, int):
        return x
    if isinstance(x, float) and math.isfinite(x):
        return int(x)
    return default


def _dumps(obj: Any) -> str:
    # allow_nan: metrics may legitimately hold NaN/inf (a diverging run); JSON readers of
    # the API get them normalised to null by the schema layer.
    return json.dumps(obj, separators=(",", ":"), default=str)


class Store:
    """SQLite-backed persistence. Thread-safe; every write method commits before returning.

    Args:
        path: the database file; its directory is created if missing.

    Raises:
        StoreError: the file belongs to a newer schema or cannot be opened.
    """

    def __init__(self, path: Path, retention: Retention | None = None) -> None:
        self.path = Path(path)
        self.retention = retention or Retention()
        self._new_steps: dict[str, int] = {}  # step records since the last thinning check
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the state directory {self.path.parent}: {exc.strerror} "
                "(set ESGD_STATE_DIR to a writable directory)"
            ) from exc
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        # The writer thread (started by the first write) and its queue of (write, future).
        # Left to SQLite's busy handler (which sleeps and retries), 10 threads writing at once
        # gave a p99 of 1.2 s per transaction on a 2-core machine; one writer grouping their
        # commits does not make them wait for each other's syncs.
        self._writes: queue.SimpleQueue[tuple[Write, Future[Any]] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        conn = self._conn()
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._write(
                lambda c: c.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer elastic-sgd (schema {row[0]} > "
                f"{SCHEMA_VERSION}): upgrade, or point ESGD_STATE_DIR elsewhere"
            )
        elif int(row[0]) < SCHEMA_VERSION:
            self._write(lambda c: _migrate(c, int(row[0])))

    @property
    def schema_version(self) -> int:
        """The schema version the database is at (:data:`SCHEMA_VERSION` once opened)."""
        row = self._conn().execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0])

    # -- connections -------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=30.0
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open {self.path}: {exc}") from exc
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is synced on every commit, so an acknowledged write survives
            # a crash of the process *and* of the machine.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")  # ms; writers queue, never fail
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a write transaction; return once it is committed and synced.

        ``fn`` runs on the writer thread, possibly in one transaction with other callers'
        writes but in its own savepoint: if it raises, only its changes are rolled back and
        the exception is raised here.
        """
        if threading.current_thread() is self._writer:
            return fn(self._conn())  # a write inside a write: already in the transaction
        return self._enqueue(fn).result()

    async def _write_async(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """:meth:`_write` for a coroutine: the event loop runs on while the commit syncs
        (no thread of the pool is held waiting for it).

        (Committing on the event loop itself was tried: under 50 closed-loop clients it
        saved the write's two extra turns of the loop but blocked the loop for every sync,
        and the throughput of all routes fell by a third.)
        """
        return await asyncio.wrap_future(self._enqueue(fn))

    def _enqueue(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        fut: Future[T] = Future()
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="esgd-store-writer", daemon=True
                )
                self._writer.start()
            self._writes.put((fn, fut))
        return fut

    def _write_loop(self) -> None:
        conn = self._conn()
        while True:
            item = self._writes.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < GROUP_COMMIT_MAX:
                try:
                    nxt = self._writes.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._writes.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                self._commit_group(conn, batch)
            except BaseException as exc:  # noqa: BLE001 - no caller may wait forever
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)

    def _commit_group(
        self, conn: sqlite3.Connection, batch: Sequence[tuple[Write, Future[Any]]]
    ) -> None:
        """One transaction for the whole batch, a savepoint per write; then settle futures."""
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for fn, fut in batch:
            conn.execute("SAVEPOINT w")
            try:
                result = fn(conn)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                conn.execute("ROLLBACK TO w")
                conn.execute("RELEASE w")
                outcomes.append((fut, None, exc))
                continue
            conn.execute("RELEASE w")
            outcomes.append((fut, result, None))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for fut, _, _ in outcomes:
                fut.set_exception(exc)
            return
        for fut, result, error in outcomes:
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

    def close(self) -> None:
        with self._writer_lock:
            writer, self._writer = self._writer, None
            if writer is not None:
                self._writes.put(None)
        if writer is not None:
            writer.join(30.0)
        with self._all_lock:
            for conn in self._all:
                with suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()

    def journal_mode(self) -> str:
        return str(self._conn().execute("PRAGMA journal_mode").fetchone()[0])

    def ping(self) -> bool:
        """True when the database answers (for ``/readyz``)."""
        try:
            self._conn().execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    # -- jobs ----------------------------------------------------------------------------

    def create_job(
        self,
        job_id: str,
        name: str,
        spec: Mapping[str, Any],
        out_dir: Path,
        *,
        state: str = "pending",
        drill_id: str | None = None,
        detail: str = "",
        now: float | None = None,
    ) -> JobRow:
        """Insert a new job, its spec and its first state event in one transaction."""
        self._write(_insert_job(job_id, name, spec, out_dir, state, drill_id, detail, now))
        row = self.get_job(job_id)
        assert row is not None
        return row

    async def create_job_async(
        self,
        job_id: str,
        name: str,
        spec: Mapping[str, Any],
        out_dir: Path,
        *,
        state: str = "pending",
        drill_id: str | None = None,
        detail: str = "",
    ) -> JobRow:
        """:meth:`create_job` for a coroutine (``POST /jobs`` runs on the event loop)."""
        await self._write_async(_insert_job(job_id, name, spec, out_dir, state, drill_id, detail))
        row = self.get_job(job_id)
        assert row is not None
        return row

    def get_job(self, job_id: str) -> JobRow | None:
        r = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if r is None else _job_row(r)

    def job_version(self, job_id: str) -> float | None:
        """When the job last changed (``updated_at``: every write to its row, its state, its
        progress, its summary or its checkpoint list sets it); None for an unknown job."""
        r = self._conn().execute("SELECT updated_at FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if r is None else float(r[0])

    def get_spec(self, job_id: str) -> dict[str, Any] | None:
        r = self._conn().execute("SELECT spec_json FROM specs WHERE job_id=?", (job_id,)).fetchone()
        return None if r is None else dict(json.loads(r[0]))

    def list_jobs(
        self,
        *,
        states: Sequence[str] | None = None,
        limit: int = 50,
        offset: int = 0,
        newest_first: bool = True,
    ) -> tuple[list[JobRow], int]:
        """A page of jobs (optionally only those in ``states``) and the total count."""
        where, args = "", cast(tuple[str, ...], ())
        if states:
            where = f"WHERE state IN ({','.join('?' * len(states))})"
            args = tuple(states)
        order = "DESC" if newest_first else "ASC"
        conn = self._conn()
        total = int(conn.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0])
        rows = conn.execute(
            f"SELECT * FROM jobs {where} ORDER BY created_at {order}, id {order} LIMIT ? OFFSET ?",
            (*args, limit, offset),
        ).fetchall()
        return [_job_row(r) for r in rows], total

    def ids_in_state(self, state: str) -> list[str]:
        """Ids of the jobs in ``state``, oldest first (cheaper than :meth:`list_jobs`)."""
        rows = self._conn().execute(
            "SELECT id FROM jobs WHERE state=? ORDER BY created_at, id", (state,)
        )
        return [str(r[0]) for r in rows]

    def error_detail(self, job_id: str) -> tuple[str | None, str | None] | None:
        """``(error, error_detail)`` of a job: its public reason and the full text behind it
        (``None`` for an unknown job)."""
        r = (
            self._conn()
            .execute("SELECT error, error_detail FROM jobs WHERE id=?", (job_id,))
            .fetchone()
        )
        return None if r is None else (r[0], r[1])

    def count_by_state(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {str(r[0]): int(r[1]) for r in rows}

    def transition(
        self,
        job_id: str,
        expected: str,
        new: str,
        *,
        detail: str,
        error: str | None = None,
        error_detail: str | None = None,
        step: int | None = None,
        started: bool = False,
        finished: bool = False,
        now: float | None = None,
    ) -> JobRow:
        """Move a job from ``expected`` to ``new`` and record the ``state`` event, atomically.

        ``error`` is the public reason of a failure (sanitized by the caller),
        ``error_detail`` its full text for operators (:meth:`error_detail`).

        Raises:
            StaleState: the job is no longer in ``expected`` (someone else moved it).
        """
        t = time.time() if now is None else now

        def write(c: sqlite3.Connection) -> None:
            sets = ["state=?", "updated_at=?"]
            args: list[Any] = [new, t]
            if error is not None:
                sets.append("error=?")
                args.append(error)
            if error_detail is not None:
                sets.append("error_detail=?")
                args.append(error_detail)
            if started:
                sets.append("started_at=COALESCE(started_at, ?)")
                args.append(t)
            if finished:
                sets.append("finished_at=?")
                args.append(t)
            cur = c.execute(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id=? AND state=?",
                (*args, job_id, expected),
            )
            if cur.rowcount != 1:
                r = c.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
                raise StaleState(job_id, expected, None if r is None else str(r[0]))
            c.execute(
                "INSERT INTO events(job_id, source, seq, wall_time, step, kind, target, detail)"
                " VALUES (?, 'service', NULL, ?, ?, 'state', ?, ?)",
                (job_id, t, step, new, detail),
            )

        self._write(write)
        row = self.get_job(job_id)
        assert row is not None
        return row

    def update_progress(
        self,
        job_id: str,
        *,
        step: int | None = None,
        total_steps: int | None = None,
        status: Mapping[str, Any] | None = None,
    ) -> None:
        """Record the latest step and status snapshot of a live job (workers, B-hat...)."""

        def write(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE jobs SET step=COALESCE(?, step), total_steps=COALESCE(?, total_steps),"
                " status_json=COALESCE(?, status_json), updated_at=? WHERE id=?",
                (
                    step,
                    total_steps,
                    None if status is None else _dumps(dict(status)),
                    time.time(),
                    job_id,
                ),
            )

        self._write(write)

    def set_summary(self, job_id: str, summary: Mapping[str, Any]) -> None:

        def write(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE jobs SET summary_json=?, updated_at=? WHERE id=?",
                (_dumps(dict(summary)), time.time(), job_id),
            )

        self._write(write)

    def add_event(
        self,
        job_id: str,
        kind: str,
        detail: str,
        *,
        target: str | None = None,
        step: int | None = None,
        now: float | None = None,
    ) -> None:
        """A service-side event (not a state change): reattach, cancel requested, ..."""
        t = time.time() if now is None else now

        def write(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO events(job_id, source, seq, wall_time, step, kind, target, detail)"
                " VALUES (?, 'service', NULL, ?, ?, ?, ?, ?)",
                (job_id, t, step, kind, target, detail),
            )

        self._write(write)

    def add_events(self, items: Sequence[tuple[str, str, str]]) -> None:
        """Several service-side events ``(job_id, kind, detail)`` in one transaction."""
        if not items:
            return
        t = time.time()

        def write(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO events(job_id, source, seq, wall_time, kind, detail)"
                " VALUES (?, 'service', NULL, ?, ?, ?)",
                [(job_id, t, kind, detail) for job_id, kind, detail in items],
            )

        self._write(write)

    def ingest(
        self,
        job_id: str,
        typed_records: Sequence[Record],
        typed_events: Sequence[Event],
    ) -> tuple[int, int]:
        """Store one poll's metric records and runner events; duplicates (same seq) are ignored.

        Checkpoint events are also recorded in ``checkpoints``.

        Returns:
            (new records, new events) actually inserted.
        """
        n_rec = n_ev = 0
        now = time.time()
        records = [r.to_dict() for r in typed_records]
        events = [e.to_dict() for e in typed_events]

        def write(c: sqlite3.Connection) -> None:
            nonlocal n_rec, n_ev
            for r in records:
                seq = _int(r.get("seq"), -1)
                if seq < 0:
                    continue
                cur = c.execute(
                    "INSERT OR IGNORE INTO metrics(job_id, seq, kind, step, wall_time, loss,"
                    " test_accuracy, samples_per_s, b_hat, data_json)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        job_id,
                        seq,
                        str(r.get("kind", "step")),
                        _int(r.get("step")),
                        _num(r.get("wall_time")),
                        _num(r.get("loss")),
                        _num(r.get("test_accuracy")),
                        _num(r.get("samples_per_s")),
                        _num(r.get("b_hat")),
                        _dumps(dict(r)),
                    ),
                )
                n_rec += cur.rowcount
            for e in events:
                seq = _int(e.get("seq"), -1)
                if seq < 0:
                    continue
                wall = _num(e.get("wall_time"))
                step = e.get("step")
                target = e.get("target")
                fault, guard = e.get("fault"), e.get("guard")
                cur = c.execute(
                    "INSERT OR IGNORE INTO events(job_id, source, seq, wall_time, time_s, step,"
                    " kind, target, detail, fault, guard)"
                    " VALUES (?, 'runner', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        seq,
                        now if wall is None else wall,
                        _num(e.get("time_s")),
                        None if step is None else _int(step),
                        str(e.get("kind", "event")),
                        None if target is None else str(target),
                        str(e.get("detail", "")),
                        None if fault is None else str(fault),
                        None if guard is None else str(guard),
                    ),
                )
                n_ev += cur.rowcount
                if cur.rowcount and e.get("kind") == "checkpoint" and step is not None:
                    c.execute(
                        "INSERT OR REPLACE INTO checkpoints(job_id, step, wall_time, path,"
                        " detail) VALUES (?,?,?,?,?)",
                        (
                            job_id,
                            _int(step),
                            now if wall is None else wall,
                            None if target is None else str(target),
                            str(e.get("detail", "")),
                        ),
                    )
                    # the job's detail (GET /jobs/{id}) lists its checkpoints: a new version
                    c.execute("UPDATE jobs SET updated_at=? WHERE id=?", (time.time(), job_id))
                    self._retain_checkpoints(c, job_id)
            self._new_steps[job_id] = self._new_steps.get(job_id, 0) + n_rec
            if self._new_steps[job_id] >= _THIN_CHECK_EVERY:
                self._new_steps[job_id] = 0
                self._thin_steps(c, job_id)

        self._write(write)
        return n_rec, n_ev

    def _retain_checkpoints(self, c: sqlite3.Connection, job_id: str) -> None:
        """Drop checkpoint rows and events of ``job_id`` past the newest kept."""
        keep = self.retention.checkpoint_records
        c.execute(
            "DELETE FROM checkpoints WHERE job_id=? AND step < (SELECT MIN(step) FROM"
            " (SELECT step FROM checkpoints WHERE job_id=? ORDER BY step DESC LIMIT ?))",
            (job_id, job_id, keep),
        )
        c.execute(
            "DELETE FROM events WHERE job_id=? AND kind='checkpoint' AND source='runner' AND"
            " id < (SELECT MIN(id) FROM (SELECT id FROM events WHERE job_id=? AND"
            " kind='checkpoint' AND source='runner' ORDER BY id DESC LIMIT ?))",
            (job_id, job_id, keep),
        )

    def _thin_steps(self, c: sqlite3.Connection, job_id: str) -> int:
        """Past ``retention.step_records``, keep every second of the older step records of
        ``job_id`` (the newest half of the budget stays whole). Returns the rows dropped."""
        cap = self.retention.step_records
        (n,) = c.execute(
            "SELECT COUNT(*) FROM metrics WHERE job_id=? AND kind='step'", (job_id,)
        ).fetchone()
        if n <= cap:
            return 0
        older = n - cap // 2
        cur = c.execute(
            "DELETE FROM metrics WHERE job_id=? AND kind='step' AND seq IN (SELECT seq FROM"
            " (SELECT seq, ROW_NUMBER() OVER (ORDER BY seq) AS r FROM metrics WHERE job_id=?"
            " AND kind='step' ORDER BY seq LIMIT ?) WHERE r % 2 = 0)",
            (job_id, job_id, older),
        )
        log.info("job %s: %d old step records thinned (retention %d)", job_id, cur.rowcount, cap)
        return int(cur.rowcount)

    # -- reads of history ----------------------------------------------------------------

    def metrics(
        self,
        job_id: str,
        *,
        since_step: int | None = None,
        after_seq: int | None = None,
        kind: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Metric records in seq order: ``step >= since_step`` and ``seq > after_seq``."""
        where: list[str] = ["job_id=?"]
        args: list[Any] = [job_id]
        if since_step is not None:
            where.append("step>=?")
            args.append(since_step)
        if after_seq is not None:
            where.append("seq>?")
            args.append(after_seq)
        if kind is not None:
            where.append("kind=?")
            args.append(kind)
        rows = self._conn().execute(
            f"SELECT seq, data_json FROM metrics WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
            (*args, limit),
        )
        out = []
        for r in rows:
            d = dict(json.loads(r[1]))
            d["seq"] = int(r[0])
            out.append(d)
        return out

    def last_metric(self, job_id: str, kind: str) -> dict[str, Any] | None:
        r = (
            self._conn()
            .execute(
                "SELECT data_json FROM metrics WHERE job_id=? AND kind=? ORDER BY seq DESC LIMIT 1",
                (job_id, kind),
            )
            .fetchone()
        )
        return None if r is None else dict(json.loads(r[0]))

    # -- history for charts and streams (GET /jobs/{id}/history, the SSE feeds) ----------

    def metric_history(
        self, job_id: str, *, max_points: int, kinds: Sequence[str] = ("step", "eval")
    ) -> dict[str, MetricSeries]:
        """Each kind of the job's metric records, thinned to at most ``max_points``.

        A kind with at most ``max_points`` records comes whole. A longer one is cut into
        ``max_points - 1`` equal spans of ``seq`` (the job's one counter of records and
        events, so equal spans of its progress) and keeps the first record of each span,
        plus its last record: a chart spans the whole run and ends at the latest value.
        Kept records are real ones (their fields agree with each other); a spike between
        two kept records is not shown.

        One SQL query, one snapshot, and no scan of the job's rows: every span's first
        record is one seek in the ``metrics_by_kind`` index, and only the kept rows' JSON is
        read (about 35 ms for 2 x 2,000 points of a 100,000-step job, against 0.4 s for a
        ``ROW_NUMBER()`` stride that numbers every row).

        Args:
            job_id: the job.
            max_points: per kind, at least 2.
            kinds: the kinds to read.

        Returns:
            ``{kind: MetricSeries}`` for the kinds the job has records of.

        Raises:
            ValueError: ``max_points`` below 2.
        """
        if max_points < 2:
            raise ValueError(f"max_points must be at least 2, not {max_points}")
        if not kinds:
            return {}
        args: dict[str, Any] = {"job": job_id, "cap": max_points}
        args.update({f"k{i}": k for i, k in enumerate(kinds)})
        values = ", ".join(f"(:k{i})" for i in range(len(kinds)))
        rows = self._conn().execute(
            f"""
            WITH RECURSIVE kinds(kind) AS (VALUES {values}),
            span AS (
                SELECT kind,
                    (SELECT MIN(seq) FROM metrics WHERE job_id = :job AND kind = kinds.kind) AS lo,
                    (SELECT MAX(seq) FROM metrics WHERE job_id = :job AND kind = kinds.kind) AS hi,
                    -- counts no further than max_points + 1: whole or thinned is all we need
                    (SELECT COUNT(*) FROM (SELECT 1 FROM metrics
                        WHERE job_id = :job AND kind = kinds.kind LIMIT :cap + 1)) AS n
                FROM kinds
            ),
            bucket(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM bucket WHERE i < :cap - 2),
            kept(kind, seq) AS (
                SELECT m.kind, m.seq FROM span AS s
                JOIN metrics AS m ON m.job_id = :job AND m.kind = s.kind WHERE s.n <= :cap
                UNION
                SELECT s.kind, (SELECT MIN(m.seq) FROM metrics AS m
                    WHERE m.job_id = :job AND m.kind = s.kind
                    AND m.seq >= s.lo + b.i * (s.hi - s.lo + 1) / (:cap - 1))
                FROM span AS s, bucket AS b WHERE s.n > :cap
                UNION
                SELECT kind, hi FROM span WHERE hi IS NOT NULL
            )
            SELECT k.kind, k.seq, s.n > :cap, m.data_json
            FROM kept AS k JOIN span AS s ON s.kind = k.kind
            JOIN metrics AS m ON m.job_id = :job AND m.seq = k.seq
            ORDER BY k.kind, k.seq
            """,
            args,
        )
        out: dict[str, MetricSeries] = {}
        for kind, seq, thinned, data in rows:
            series = out.get(kind)
            if series is None:
                series = out[kind] = MetricSeries(str(kind), [], bool(thinned))
            d = dict(json.loads(data))
            d["seq"] = int(seq)
            series.records.append(d)
        return out

    def stream_head(self, job_id: str) -> tuple[int, int]:
        """``(latest metric seq or -1, latest event id or 0)`` of a job: where a live feed
        of its new records and events starts (two reads of the primary key and of
        ``events_by_job``)."""
        conn = self._conn()
        (seq,) = conn.execute(
            "SELECT COALESCE(MAX(seq), -1) FROM metrics WHERE job_id=?", (job_id,)
        ).fetchone()
        (event_id,) = conn.execute(
            "SELECT COALESCE(MAX(id), 0) FROM events WHERE job_id=?", (job_id,)
        ).fetchone()
        return int(seq), int(event_id)

    def recent_events(self, job_id: str, limit: int) -> list[EventRow]:
        """The job's latest ``limit`` events, oldest first."""
        r = (
            self._conn()
            .execute(
                "SELECT id FROM events WHERE job_id=? ORDER BY id DESC LIMIT 1 OFFSET ?",
                (job_id, limit),
            )
            .fetchone()
        )
        return self.events(job_id, after_id=None if r is None else int(r[0]), limit=limit)

    def events(
        self,
        job_id: str,
        *,
        after_id: int | None = None,
        kind: str | None = None,
        limit: int = 1000,
    ) -> list[EventRow]:
        where: list[str] = ["job_id=?"]
        args: list[Any] = [job_id]
        if after_id is not None:
            where.append("id>?")
            args.append(after_id)
        if kind is not None:
            where.append("kind=?")
            args.append(kind)
        rows = self._conn().execute(
            f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
            (*args, limit),
        )
        return [
            EventRow(
                id=int(r["id"]),
                job_id=str(r["job_id"]),
                source=str(r["source"]),
                seq=r["seq"],
                wall_time=float(r["wall_time"]),
                time_s=r["time_s"],
                step=r["step"],
                kind=str(r["kind"]),
                target=r["target"],
                detail=str(r["detail"]),
                fault=r["fault"],
                guard=r["guard"],
            )
            for r in rows
        ]

    def typed_events(self, job_id: str) -> list[Event]:
        """The coordinator's events of a job, typed, in the order they were stored.

        Service-side events (state changes, queueing) are left out: they are not the run's.
        A row whose kind or fault kind this version does not know (an older database) is
        skipped rather than guessed.
        """
        rows = self._conn().execute(
            "SELECT seq, wall_time, time_s, step, kind, target, detail, fault, guard FROM events"
            " WHERE job_id=? AND source='runner' ORDER BY id",
            (job_id,),
        )
        out = []
        for r in rows:
            with suppress(ValueError):
                out.append(Event.from_dict(dict(r)))
        return out

    def typed_records(self, job_id: str) -> list[Record]:
        """Every step and eval record of a job, typed, in seq order."""
        rows = self._conn().execute(
            "SELECT seq, data_json FROM metrics WHERE job_id=? ORDER BY seq", (job_id,)
        )
        out = []
        for r in rows:
            d = dict(json.loads(r[1]))
            d["seq"] = int(r[0])
            with suppress(KeyError, TypeError, ValueError):  # a record of an older version
                out.append(record_from_dict(d))
        return out

    def event_counts(self, kinds: Sequence[str]) -> dict[tuple[str, str], int]:
        """``{(job_id, kind): count}`` of runner and service events of the given kinds."""
        if not kinds:
            return {}
        rows = self._conn().execute(
            f"SELECT job_id, kind, COUNT(*) FROM events WHERE kind IN"
            f" ({','.join('?' * len(kinds))}) GROUP BY job_id, kind",
            tuple(kinds),
        )
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    def state_entries(self, state: str) -> dict[str, int]:
        """``{job_id: times the job entered state}`` (from its ``state`` events)."""
        rows = self._conn().execute(
            "SELECT job_id, COUNT(*) FROM events WHERE kind='state' AND source='service'"
            " AND target=? GROUP BY job_id",
            (state,),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def checkpoints(self, job_id: str) -> list[CheckpointRow]:
        rows = self._conn().execute(
            "SELECT * FROM checkpoints WHERE job_id=? ORDER BY step", (job_id,)
        )
        return [
            CheckpointRow(
                str(r["job_id"]), int(r["step"]), float(r["wall_time"]), r["path"], str(r["detail"])
            )
            for r in rows
        ]

    # -- drills --------------------------------------------------------------------------

    def create_drill(
        self, drill_id: str, name: str, spec: Mapping[str, Any], *, state: str = "pending"
    ) -> DrillRow:
        t = time.time()

        def write(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO drills(id, name, state, created_at, updated_at, spec_json)"
                " VALUES (?,?,?,?,?,?)",
                (drill_id, name, state, t, t, _dumps(dict(spec))),
            )

        self._write(write)
        row = self.get_drill(drill_id)
        assert row is not None
        return row

    def update_drill(
        self,
        drill_id: str,
        *,
        state: str | None = None,
        job_id: str | None = None,
        report: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> None:

        def write(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE drills SET state=COALESCE(?, state), job_id=COALESCE(?, job_id),"
                " report_json=COALESCE(?, report_json), error=COALESCE(?, error),"
                " updated_at=? WHERE id=?",
                (
                    state,
                    job_id,
                    None if report is None else _dumps(dict(report)),
                    error,
                    time.time(),
                    drill_id,
                ),
            )

        self._write(write)

    def get_drill(self, drill_id: str) -> DrillRow | None:
        r = self._conn().execute("SELECT * FROM drills WHERE id=?", (drill_id,)).fetchone()
        if r is None:
            return None
        return DrillRow(
            id=str(r["id"]),
            name=str(r["name"]),
            state=str(r["state"]),
            created_at=float(r["created_at"]),
            updated_at=float(r["updated_at"]),
            spec=dict(json.loads(r["spec_json"])),
            job_id=r["job_id"],
            report=None if r["report_json"] is None else dict(json.loads(r["report_json"])),
            error=r["error"],
        )

    def list_drills(self, *, states: Sequence[str] | None = None) -> list[DrillRow]:
        where, args = "", cast(tuple[str, ...], ())
        if states:
            where = f"WHERE state IN ({','.join('?' * len(states))})"
            args = tuple(states)
        ids = [
            str(r[0])
            for r in self._conn().execute(
                f"SELECT id FROM drills {where} ORDER BY created_at", args
            )
        ]
        return [d for i in ids if (d := self.get_drill(i)) is not None]


def _migrate(c: sqlite3.Connection, version: int) -> None:
    """Bring a database written at schema ``version`` to :data:`SCHEMA_VERSION`, in place.

    Each step is one schema version; all run in one transaction (the caller's write), so a
    failed migration leaves the database as it was.
    """
    if version < 2:
        # events.fault: rows written before it have NULL (their fault kind was not stored)
        cols = {str(r[1]) for r in c.execute("PRAGMA table_info(events)")}
        if "fault" not in cols:
            c.execute("ALTER TABLE events ADD COLUMN fault TEXT")
    if version < 3:
        # jobs.error_detail: the full text moves there; error keeps only its public form
        cols = {str(r[1]) for r in c.execute("PRAGMA table_info(jobs)")}
        if "error_detail" not in cols:
            c.execute("ALTER TABLE jobs ADD COLUMN error_detail TEXT")
        failed = c.execute("SELECT id, error FROM jobs WHERE error IS NOT NULL").fetchall()
        for job_id, error in failed:
            c.execute(
                "UPDATE jobs SET error=?, error_detail=COALESCE(error_detail, ?) WHERE id=?",
                (public_error(error), error, job_id),
            )
    if version < 4:
        # events.guard: guard events written before it have NULL (their action was in the
        # detail only)
        cols = {str(r[1]) for r in c.execute("PRAGMA table_info(events)")}
        if "guard" not in cols:
            c.execute("ALTER TABLE events ADD COLUMN guard TEXT")
    c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))


def _insert_job(
    job_id: str,
    name: str,
    spec: Mapping[str, Any],
    out_dir: Path,
    state: str,
    drill_id: str | None,
    detail: str,
    now: float | None = None,
) -> Write:
    """The write that creates a job: its row, its spec and its first state event."""
    t = time.time() if now is None else now
    spec_json = _dumps(spec)

    def write(c: sqlite3.Connection) -> None:
        c.execute(
            "INSERT INTO jobs(id, name, state, created_at, updated_at, out_dir, drill_id,"
            " status_json) VALUES (?,?,?,?,?,?,?,?)",
            (job_id, name, state, t, t, str(out_dir), drill_id, "{}"),
        )
        c.execute("INSERT INTO specs(job_id, spec_json) VALUES (?, ?)", (job_id, spec_json))
        c.execute(
            "INSERT INTO events(job_id, source, seq, wall_time, kind, target, detail)"
            " VALUES (?, 'service', NULL, ?, 'state', ?, ?)",
            (job_id, t, state, detail or f"job submitted: {state}"),
        )

    return write


def _job_row(r: sqlite3.Row) -> JobRow:
    return JobRow(
        id=str(r["id"]),
        name=str(r["name"]),
        state=str(r["state"]),
        created_at=float(r["created_at"]),
        updated_at=float(r["updated_at"]),
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        step=int(r["step"]),
        total_steps=r["total_steps"],
        error=r["error"],
        status=dict(json.loads(r["status_json"] or "{}")),
        summary=None if r["summary_json"] is None else dict(json.loads(r["summary_json"])),
        out_dir=str(r["out_dir"]),
        drill_id=r["drill_id"],
    )
