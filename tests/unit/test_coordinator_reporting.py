"""Unit tests for actors/coordinator/reporting.py (no Ray): event and record sequence numbers,
poll acknowledgement, journal entries, recovery timings, timing means and the summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from actors.checkpoint import Journal
from actors.coordinator.reporting import Reporter, RunFacts, Timing
from actors.messages import GradientReply
from core.events import EvalRecord, Event, EventKind, FaultKind, StepRecord
from core.spec import parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _reporter(journal: Journal | None = None, step: int = 5) -> Reporter:
    return Reporter(100.0, journal, lambda: step)


def _step(r: Reporter, loss: float = 0.5, samples: int = 128) -> None:
    r.step_record(
        loss=loss, samples=samples, b_hat=0.1, b_hat_max=0.2, bound=1.0, workers=4, refused=0
    )


def test_events_and_records_share_one_sequence_and_the_current_step() -> None:
    r = _reporter()
    r.event(EventKind.FAULT, "boom", target="worker-1", fault=FaultKind.CRASH)
    _step(r)
    r.eval_record({"test_accuracy": 0.9, "test_loss": math.nan}, workers=4)
    r.event(EventKind.STATE, "x", step=2)
    assert [x.seq for x in [*r.records, *r.events]] == [2, 3, 1, 4]
    ev = r.events[0]
    assert (ev.step, ev.kind, ev.fault, ev.target) == (
        5,
        EventKind.FAULT,
        FaultKind.CRASH,
        "worker-1",
    )
    assert r.events[1].step == 2  # told otherwise
    assert isinstance(r.records[0], StepRecord) and r.records[0].step == 5
    ev_rec = r.records[1]
    assert isinstance(ev_rec, EvalRecord) and ev_rec.metrics["test_loss"] is None  # nan -> None
    assert r.last_eval["test_accuracy"] == 0.9


def test_poll_drops_what_was_acknowledged() -> None:
    r = _reporter()
    for i in range(3):
        r.event(EventKind.MEMBERSHIP, f"e{i}")
    recs, evs = r.poll(0)
    assert [e.seq for e in evs] == [1, 2, 3] and recs == []
    _, evs = r.poll(2)
    assert [e.seq for e in evs] == [3]
    assert [e.seq for e in r.event_log] == [1, 2, 3]  # the run's log keeps everything


def test_journal_gets_every_event_and_record(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.jsonl")
    r = _reporter(j)
    r.event(EventKind.CHECKPOINT, "step 5 -> a")
    _step(r, loss=math.nan)
    r.flush()
    lines = [json.loads(x) for x in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [x["seq"] for x in lines] == [1, 2]
    assert lines[1]["loss"] is None  # a step without gradients has no loss


def test_replayed_items_continue_the_sequence() -> None:
    r = _reporter()
    r.replay(Event(seq=7, wall_time=1.0, time_s=1.0, step=0, kind=EventKind.STATE, detail="s"))
    r.event(EventKind.RESTART, "again")
    assert [e.seq for e in r.event_log] == [7, 8]


def test_recovery_timings_from_fault_to_detection_update_and_rejoin() -> None:
    r = _reporter()
    r.worker_lost(2, now=10.0)  # not planned: counted from detection
    r.recoveries[0].t_fault = 9.0
    r.note_update()
    r.worker_rejoined(2, now=12.0)
    (s,) = r.recovery_summary()
    assert s["kind"] == "lost" and s["worker"] == 2
    assert s["detected_after_s"] == pytest.approx(1.0)
    assert s["rejoined_after_s"] == pytest.approx(3.0)
    assert s["next_update_after_s"] > 0


def test_timing_means() -> None:
    t = Timing()
    for c in (0.01, 0.03):
        reply = GradientReply(0, 0, 1.0, 32, 1.0, 1.0, compute_s=c, delay_s=0.005)
        t.see(reply, roundtrip_s=c + 0.01)
    t.see_apply(0.002)
    t.see_apply(None)  # not timed: not counted
    s = t.summary()
    assert s["compute_ms"] == pytest.approx(20.0)
    assert s["overhead_ms"] == pytest.approx(5.0)
    assert s["apply_ms"] == pytest.approx(2.0)
    assert t.mean_roundtrip_s == pytest.approx(0.03)


def test_summary_carries_the_runs_facts() -> None:
    spec = parse_spec({"steps": 10, "workers": 2, "mode": {"name": "local", "local_steps": 2}})
    r = _reporter()
    r.eval_record({"test_accuracy": 0.97, "test_perplexity": 3.5}, workers=2)
    r.event(EventKind.STATE, "running")
    facts = RunFacts(
        job_id="j",
        spec=spec,
        state="succeeded",
        error=None,
        steps=10,
        total_steps=10,
        updates=10,
        samples=1280,
        workers_final=2,
        refused=0,
        dropped=1,
        corrupted=2,
        refused_nonfinite=1,
        steps_all_lost=1,
        restarts=0,
        steps_lost=0,
        parameters=42,
        consistency={"b_hat_max": 0.5},
        t_start=100.0,
        t_end=110.0,
    )
    s = r.summary(facts)
    assert s["mode"] == "local" and s["mode_settings"]["local_steps"] == 2
    assert s["samples_per_s"] == pytest.approx(128.0)
    assert s["final_test_accuracy"] == 0.97 and s["dropped_gradients"] == 1
    assert s["final_eval"] == {"test_accuracy": 0.97, "test_perplexity": 3.5}  # a task's own
    assert (s["gradients_corrupted"], s["gradients_refused_nonfinite"]) == (2, 1)
    assert s["steps_all_lost"] == 1
    assert [e["kind"] for e in s["events"]] == ["state"]
