"""The SQLite store: schema, compare-and-set transitions, dedupe, durability across kill -9."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.events import Event, Record, record_from_dict
from service import store as store_mod
from service.store import SCHEMA_VERSION, Retention, StaleState, Store, StoreError, new_id

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "db.sqlite3")
    yield s
    s.close()


def _job(store: Store, name: str = "j", state: str = "pending", now: float | None = None) -> str:
    jid = new_id()
    store.create_job(
        jid, name, {"name": name, "steps": 5}, Path("/tmp/x") / jid, state=state, now=now
    )
    return jid


def _rec(seq: int, step: int, kind: str = "step", **kw: object) -> Record:
    base: dict[str, object] = {"seq": seq, "kind": kind, "step": step, "time_s": 0.0}
    base["wall_time"] = 1e9 + seq
    if kind == "step":
        base.update(loss=1.0 / (step + 1), samples_per_s=1.0, samples=0, b_hat=0.0)
        base.update(b_hat_max=0.0, bound=None, workers=1)
    return record_from_dict({**base, **kw})


def _ev(**kw: object) -> Event:
    return Event.from_dict(dict(kw))


def test_wal_mode_and_schema_version(store: Store) -> None:
    assert store.journal_mode() == "wal"
    conn = sqlite3.connect(store.path)
    (v,) = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert int(v) == SCHEMA_VERSION
    conn.close()


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    s.close()
    conn = sqlite3.connect(tmp_path / "db")
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer elastic-sgd"):
        Store(tmp_path / "db")


def test_unwritable_state_dir_names_the_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="ESGD_STATE_DIR"):
        Store(blocker / "sub" / "db")


def test_create_get_spec_and_first_event(store: Store) -> None:
    jid = _job(store, "alpha")
    row = store.get_job(jid)
    assert row is not None and row.state == "pending" and row.name == "alpha"
    assert store.get_spec(jid) == {"name": "alpha", "steps": 5}
    evs = store.events(jid)
    assert [(e.kind, e.target, e.source) for e in evs] == [("state", "pending", "service")]
    assert store.get_job("nope") is None and store.get_spec("nope") is None


def test_list_filters_paginates_and_counts(store: Store) -> None:
    ids = [_job(store, f"j{i}", now=1000.0 + i) for i in range(7)]
    store.transition(ids[0], "pending", "cancelled", detail="x")
    page, total = store.list_jobs(limit=3, offset=0)
    assert total == 7 and [r.id for r in page] == ids[::-1][:3]  # newest first
    page2, _ = store.list_jobs(limit=3, offset=3)
    assert [r.id for r in page2] == ids[::-1][3:6]
    pend, n = store.list_jobs(states=["pending"], limit=100)
    assert n == 6 and ids[0] not in {r.id for r in pend}
    assert store.count_by_state() == {"pending": 6, "cancelled": 1}


def test_transition_is_compare_and_set_with_its_event(store: Store) -> None:
    jid = _job(store)
    row = store.transition(jid, "pending", "starting", detail="go", started=False)
    assert row.state == "starting"
    with pytest.raises(StaleState) as ei:
        store.transition(jid, "pending", "cancelled", detail="late")
    assert ei.value.actual == "starting"
    assert store.get_job(jid).state == "starting"  # type: ignore[union-attr]
    # the refused change left no event behind
    assert [e.target for e in store.events(jid)] == ["pending", "starting"]
    row = store.transition(jid, "starting", "running", detail="r", started=True)
    assert row.started_at is not None and row.finished_at is None
    row = store.transition(jid, "running", "failed", detail="boom", error="boom", finished=True)
    assert row.error == "boom" and row.finished_at is not None
    assert store.state_entries("running") == {jid: 1}


def test_ingest_dedupes_on_seq_and_indexes_finite_values(store: Store) -> None:
    jid = _job(store)
    recs = [_rec(1, 1), _rec(2, 2, loss=math.nan), _rec(3, 2, "eval", test_accuracy=0.5)]
    evs = [_ev(seq=4, kind="fault", target="worker-1", detail="crash", step=2, wall_time=5.0)]
    assert store.ingest(jid, recs, evs) == (3, 1)
    # the same poll delivered again (crash before acknowledgement) adds nothing
    assert store.ingest(jid, recs, evs) == (0, 0)
    got = store.metrics(jid)
    assert [r["seq"] for r in got] == [1, 2, 3]
    assert got[1]["loss"] is None  # NaN becomes null in the record and the indexed column
    assert store.last_metric(jid, "eval")["test_accuracy"] == 0.5  # type: ignore[index]
    runner_evs = [e for e in store.events(jid) if e.source == "runner"]
    assert [(e.seq, e.kind, e.target) for e in runner_evs] == [(4, "fault", "worker-1")]
    assert store.event_counts(["fault"]) == {(jid, "fault"): 1}


def test_metric_filters(store: Store) -> None:
    jid = _job(store)
    store.ingest(jid, [_rec(i, i // 2, "eval" if i % 3 == 0 else "step") for i in range(1, 13)], [])
    assert all(r["step"] >= 4 for r in store.metrics(jid, since_step=4))
    assert [r["seq"] for r in store.metrics(jid, after_seq=10)] == [11, 12]
    assert {r["kind"] for r in store.metrics(jid, kind="eval")} == {"eval"}
    assert len(store.metrics(jid, limit=5)) == 5
    evs = store.events(jid)
    assert store.events(jid, after_id=evs[-1].id) == []


def test_checkpoint_events_become_checkpoint_records(store: Store) -> None:
    jid = _job(store, now=1.0)
    assert store.job_version(jid) == 1.0 and store.job_version("nope") is None
    store.ingest(jid, [_rec(5, 5)], [])
    assert store.job_version(jid) == 1.0  # metric records are not part of the job's row
    store.ingest(
        jid,
        [],
        [
            _ev(
                seq=1,
                kind="checkpoint",
                step=20,
                target="ckpt-20.pt",
                detail="sha256 ab",
                wall_time=3.0,
            )
        ],
    )
    (c,) = store.checkpoints(jid)
    assert (c.step, c.path, c.detail) == (20, "ckpt-20.pt", "sha256 ab")
    v = store.job_version(jid)
    assert v is not None and v > 1.0  # the job's detail lists its checkpoints: a new version


def test_retention_keeps_the_newest_checkpoints_and_thins_old_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded growth: 30 checkpoints at a budget of 5 leave the newest 5 rows and events;
    2,000 step records at a budget of 400 leave at most ~400, the newest 200 whole, and
    every evaluation record."""
    monkeypatch.setattr(store_mod, "_THIN_CHECK_EVERY", 100)
    st = Store(tmp_path / "db.sqlite3", Retention(checkpoint_records=5, step_records=400))
    try:
        jid = _job(st)
        for i in range(1, 31):
            ev = _ev(seq=i, kind="checkpoint", step=i * 10, detail=f"c{i}", wall_time=float(i))
            st.ingest(jid, [], [ev])
        assert [c.step for c in st.checkpoints(jid)] == [260, 270, 280, 290, 300]
        kept = st.events(jid, kind="checkpoint", limit=1000)
        assert sorted(e.step for e in kept) == [260, 270, 280, 290, 300]
        seq = 100
        for chunk in range(20):  # 2,000 step records and one eval record per 100 steps
            recs = [_rec(seq + k, chunk * 100 + k + 1) for k in range(100)]
            recs.append(_rec(seq + 100, chunk * 100 + 100, kind="eval", test_loss=1.0))
            seq += 101
            st.ingest(jid, recs, [])
        steps = [m["step"] for m in st.metrics(jid, kind="step", limit=100_000)]
        assert len(steps) <= 400 + 100  # the budget, plus at most one check's worth
        assert steps[-200:] == list(range(1801, 2001))  # the newest half whole
        assert steps[0] == 1  # the oldest survives thinning
        evals = st.metrics(jid, kind="eval", limit=100_000)
        assert len(evals) == 20
    finally:
        st.close()


def test_a_guard_events_action_is_stored_typed(store: Store) -> None:
    jid = _job(store)
    ev = _ev(seq=1, kind="guard", step=40, detail="out of bound", wall_time=1.0, guard="tighten")
    store.ingest(jid, [], [ev])
    (row,) = store.events(jid, kind="guard")
    assert row.guard == "tighten"
    (typed,) = store.typed_events(jid)
    assert typed.guard == "tighten"


def test_progress_summary_and_status_roundtrip(store: Store) -> None:
    jid = _job(store)
    store.update_progress(jid, step=7, total_steps=60, status={"workers": [{"id": 0}]})
    store.update_progress(jid, step=None, status=None)  # keeps what was there
    store.set_summary(jid, {"final_test_accuracy": 0.9})
    row = store.get_job(jid)
    assert row is not None
    assert (row.step, row.total_steps) == (7, 60)
    assert row.status == {"workers": [{"id": 0}]}
    assert row.summary == {"final_test_accuracy": 0.9}


def test_drills(store: Store) -> None:
    d = store.create_drill("d1", "crash", {"name": "crash"}, state="running")
    assert d.state == "running" and d.job_id is None
    store.update_drill("d1", job_id="j1")
    store.update_drill("d1", state="passed", report={"passed": True})
    d2 = store.get_drill("d1")
    assert d2 is not None and (d2.state, d2.job_id, d2.report) == ("passed", "j1", {"passed": True})
    assert [x.id for x in store.list_drills(states=["passed"])] == ["d1"]
    assert store.list_drills(states=["running"]) == []
    assert store.get_drill("nope") is None


def test_concurrent_writers_and_readers(store: Store) -> None:
    jid = _job(store)
    errors: list[BaseException] = []

    def writer(base: int) -> None:
        try:
            for i in range(50):
                store.ingest(jid, [_rec(base + i, i)], [])
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(50):
                store.metrics(jid)
                store.list_jobs()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.metrics(jid, limit=10_000)) == 200


_WRITER = """
import sys
from pathlib import Path
from core.events import record_from_dict
from service.store import Store
s = Store(Path(sys.argv[1]))
s.create_job("job1", "j", {}, Path("/tmp/j"))
i = 0
while True:
    i += 1
    rec = {"seq": i, "kind": "step", "step": i, "time_s": 0.0, "wall_time": 0.0, "loss": 1.0}
    rec.update(samples_per_s=0.0, samples=0, b_hat=0.0, b_hat_max=0.0, bound=None, workers=1)
    s.ingest("job1", [record_from_dict(rec)], [])
    print(i, flush=True)  # acknowledged only after the commit returned
"""


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    acked = 0
    deadline = time.monotonic() + 30
    while acked < 30 and time.monotonic() < deadline:
        acked = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert acked >= 30
    s = Store(db)
    seqs = [r["seq"] for r in s.metrics("job1", limit=100_000)]
    s.close()
    assert seqs[:acked] == list(range(1, acked + 1))  # every acknowledged record is there


def test_queued_writes_share_a_commit_and_fail_alone(store: Store) -> None:
    """Group commit: writes queued while the writer is busy run in one transaction, each in
    its own savepoint, so a refused one (a stale compare-and-set) rolls back only itself."""
    jid = _job(store)
    gate = threading.Event()
    # hold the writer thread inside a write until everything below is queued behind it
    blocker = threading.Thread(target=store._write, args=(lambda _c: gate.wait(10),))
    blocker.start()
    while store._writes.qsize() or not store._writer:
        time.sleep(0.001)
    time.sleep(0.05)
    results: dict[str, object] = {}

    def run(name: str, fn: Callable[[], object]) -> None:
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - the outcome is the assertion
            results[name] = exc

    calls = {
        "a": lambda: store.ingest(jid, [_rec(1, 1)], []),
        "stale": lambda: store.transition(jid, "running", "failed", detail="x"),
        "b": lambda: store.ingest(jid, [_rec(2, 2)], []),
        "move": lambda: store.transition(jid, "pending", "starting", detail="go"),
    }
    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    while store._writes.qsize() < len(calls):
        time.sleep(0.001)
    gate.set()
    for t in [*threads, blocker]:
        t.join(10)
    assert results["a"] == (1, 0) and results["b"] == (1, 0)
    assert isinstance(results["stale"], StaleState)
    row = store.get_job(jid)
    assert row is not None and row.state == "starting"
    assert [e.target for e in store.events(jid, kind="state")] == ["pending", "starting"]
    assert [r["seq"] for r in store.metrics(jid)] == [1, 2]


def test_async_writes_commit_before_returning(store: Store) -> None:
    async def submit_all() -> list[str]:
        rows = await asyncio.gather(
            *(
                store.create_job_async(f"j{i}", "j", {"i": i}, Path("/tmp/x") / f"j{i}")
                for i in range(20)
            )
        )
        return [r.id for r in rows]

    ids = asyncio.run(submit_all())
    assert sorted(ids) == sorted(f"j{i}" for i in range(20))
    # visible to another connection (another thread), spec and first event included
    seen: list[object] = []
    t = threading.Thread(target=lambda: seen.extend(store.get_spec(i) for i in ids))
    t.start()
    t.join()
    assert seen == [{"i": int(i[1:])} for i in ids]
    assert set(store.ids_in_state("pending")) == set(ids)


# -- events keep their fault kind; typed reads; schema 1 -> 2 --------------------------------


def test_events_keep_their_fault_kind_and_read_back_typed(store: Store) -> None:
    jid = _job(store)
    crash = _ev(seq=1, wall_time=1e9, time_s=0.5, step=3, kind="fault", target="worker-1")
    crash = Event.from_dict({**crash.to_dict(), "fault": "crash"})
    lost = _ev(seq=2, wall_time=1e9 + 1, time_s=1.5, step=4, kind="detect", target="worker-1")
    store.ingest(jid, [_rec(3, 1), _rec(4, 2, "eval", test_accuracy=0.5)], [crash, lost])
    (row, _) = [e for e in store.events(jid) if e.source == "runner"]
    assert row.fault == "crash"
    # the service's own events (the job's state) are not the run's
    assert store.typed_events(jid) == [crash, lost]
    recs = store.typed_records(jid)
    assert [type(r).__name__ for r in recs] == ["StepRecord", "EvalRecord"]
    assert recs == [_rec(3, 1), _rec(4, 2, "eval", test_accuracy=0.5)]


def _schema_1_db(path: Path) -> None:
    """A database as schema 1 wrote it: no events.fault; one job with a runner event."""
    from service import store as store_module

    v1 = store_module._SCHEMA.replace(
        "    fault TEXT,                    -- a FaultKind value, or NULL (added in schema 2)\n",
        "",
    ).replace(
        "    guard TEXT,                    -- a guard event's action, or NULL"
        " (added in schema 4)\n",
        "",
    )
    assert "fault TEXT" not in v1 and "guard TEXT" not in v1
    conn = sqlite3.connect(path)
    conn.executescript(v1)
    conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
    conn.execute(
        "INSERT INTO jobs(id, name, state, created_at, updated_at, out_dir) "
        "VALUES ('old', 'old', 'succeeded', 1.0, 1.0, '/tmp/old')"
    )
    conn.execute(
        "INSERT INTO events(job_id, source, seq, wall_time, time_s, step, kind, target, detail)"
        " VALUES ('old', 'runner', 1, 5.0, 0.5, 2, 'fault', 'worker-0', 'crash injected')"
    )
    conn.commit()
    conn.close()


def test_a_schema_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    _schema_1_db(path)
    s = Store(path)
    try:
        assert s.schema_version == SCHEMA_VERSION == 4
        cols = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(events)")}
        assert "fault" in cols and "guard" in cols
        (old,) = s.typed_events("old")  # kept; its fault kind was never stored
        assert old.kind == "fault" and old.fault is None and old.target == "worker-0"
        new = Event.from_dict({**old.to_dict(), "seq": 2, "fault": "crash"})
        assert s.ingest("old", [], [new]) == (0, 1)
        assert [e.fault for e in s.typed_events("old")] == [None, "crash"]
    finally:
        s.close()
    again = Store(path)  # opening a migrated database changes nothing
    try:
        assert again.schema_version == SCHEMA_VERSION and len(again.typed_events("old")) == 2
    finally:
        again.close()
