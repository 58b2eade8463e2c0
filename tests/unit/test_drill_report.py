"""The drill report's pure parts: recovery numbers from typed events and records, planned
faults matched to their events, the markdown and the plot (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.errors import SpecError
from core.events import EvalRecord, Event, EventKind, FaultKind, StepRecord
from service.drills.analyse import (
    ExternalFault,
    coordinator_recoveries,
    fault_coverage,
    worker_recoveries,
)
from service.drills.report import render_markdown
from service.drills.run import write_report
from service.drills.spec import DrillSpec, load_drill, parse_drill

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

T0 = 1_000_000.0  # wall time of the job's start


def ev(
    t: float,
    kind: EventKind,
    target: str | None,
    detail: str = "",
    step: int = 0,
    fault: FaultKind | None = None,
) -> Event:
    return Event(
        seq=int(t * 100),
        wall_time=T0 + t,
        time_s=t,
        step=step,
        kind=kind,
        detail=detail,
        target=target,
        fault=fault,
    )


def step(t: float, n: int, **kw: Any) -> StepRecord:
    fields: dict[str, Any] = {
        "loss": 1.0,
        "samples_per_s": 100.0,
        "samples": 32 * n,
        "b_hat": 0.0,
        "b_hat_max": 0.0,
        "bound": None,
        "workers": 4,
    }
    fields.update(kw)
    return StepRecord(seq=int(t * 100) + 1, step=n, time_s=t, wall_time=T0 + t, **fields)


def _drill(faults: list[dict[str, Any]], **criteria: Any) -> DrillSpec:
    return parse_drill(
        {
            "name": "d",
            "job": {"steps": 100, "workers": 4, "faults": faults},
            "criteria": criteria,
        }
    )


M, F, D = EventKind.MEMBERSHIP, EventKind.FAULT, EventKind.DETECT


def test_worker_recovery_runs_from_the_fault_through_detection_to_the_next_update() -> None:
    events = [
        ev(1.0, F, "worker-1", "straggler delay on", fault=FaultKind.DELAY),
        ev(2.0, F, "worker-1", "crash injected: SIGKILL pid 42", 50, FaultKind.CRASH),
        ev(2.1, D, "worker-1", "worker lost: ActorDiedError", 51),
        ev(2.1, M, "worker-1", "starting a worker", 51),
        ev(2.5, EventKind.MISSING, "worker-2", "gradient missing", 55, FaultKind.DROP),
        ev(6.0, M, "worker-1", "worker joined (node ab, pid 43)", 90),
    ]
    records = [step(1.5, 49), step(2.05, 50), step(2.3, 51), step(2.4, 52)]
    # the runtime's own measure of the rejoin: 4 s after the crash fired
    summary = {"recoveries": [{"kind": "crash", "worker": 1, "rejoined_after_s": 4.0}]}
    (r,) = worker_recoveries(events, records, summary)  # a dropped gradient is not a loss
    assert r.worker == "worker-1" and r.fault == "crash"
    assert r.cause == "crash injected: SIGKILL pid 42"  # the delay before it is not a cause
    assert r.detect_after_s == pytest.approx(0.1)
    assert r.next_update_step == 51
    assert r.next_update_after_s == pytest.approx(0.3)
    assert r.next_update_after_detect_s == pytest.approx(0.2)
    assert r.replacement_started and r.replacement_joined_after_s == pytest.approx(4.0)


def test_a_death_nobody_injected_is_timed_from_its_detection() -> None:
    events = [ev(3.0, D, "worker-0", "worker lost: ActorUnavailableError", 80)]
    (r,) = worker_recoveries(events, [step(3.2, 81)], {})
    assert r.cause == "not injected" and r.fault is None and r.detect_after_s is None
    assert r.next_update_after_s == pytest.approx(0.2)
    assert not r.replacement_started and r.replacement_joined_after_s is None


def test_coordinator_recovery_counts_the_steps_done_again() -> None:
    events = [
        ev(5.0, EventKind.CHECKPOINT, None, "step 150 -> ckpt-0000000150.pt", 150),
        ev(6.0, F, "coordinator", "crash at 170", 170, FaultKind.COORDINATOR_CRASH),
        ev(11.0, EventKind.RESTART, "coordinator", "restarted from ckpt (step 150)", 150),
    ]
    records = [step(5.9, 170), step(11.5, 151), step(11.6, 152)]
    (c,) = coordinator_recoveries(events, records)
    assert c.injected and c.crash_step == 170 and c.resumed_step == 151
    assert c.steps_lost == 20
    assert c.restarted_after_s == pytest.approx(5.0)
    assert c.resume_after_s == pytest.approx(5.5)


def test_each_planned_fault_is_matched_to_its_events() -> None:
    d = _drill(
        [
            {"kind": "crash", "workers": [1], "at_step": 10},
            {"kind": "partition", "workers": [2, 3], "at_step": 20, "duration_s": 1.0},
            {"kind": "drop", "probability": 0.1},
            {"kind": "coordinator_crash", "at_step": 30},
        ]
    )
    joined = [ev(0.5, M, f"worker-{w}", "worker joined (node x)") for w in range(4)]
    events = [
        *joined,
        ev(1.0, F, "worker-1", "crash injected", 10, FaultKind.CRASH),
        ev(2.0, F, "worker-2", "partition: cut off", 20, FaultKind.PARTITION),
        ev(2.2, EventKind.HEAL, "worker-3", "partition healed", 21, FaultKind.PARTITION),
        ev(2.5, F, "worker-0", "gradient of step 25 dropped", 25, FaultKind.DROP),
    ]
    cov = fault_coverage(d.job, events, {})
    assert [(c.kind, c.recorded, c.required) for c in cov] == [
        ("crash", True, True),
        ("partition", False, True),  # worker-3 was never cut off (a heal is not a firing)
        ("drop", True, False),  # a probability may never fire
        ("coordinator_crash", False, True),
    ]
    assert cov[1].targets_seen == ["worker-2"]


def test_a_target_that_never_joined_cannot_be_missed() -> None:
    d = _drill([{"kind": "delay", "workers": [0, 3], "delay_ms": 5}])
    events = [
        ev(0.5, M, "worker-0", "worker joined (node x)"),
        ev(0.6, F, "worker-0", "straggler delay on", fault=FaultKind.DELAY),
    ]
    (c,) = fault_coverage(d.job, events, {"timing": {"delay_ms": 2.5}})
    assert c.recorded and "2.5 ms" in c.note


def test_write_report_files_and_an_external_fault(tmp_path: Path) -> None:
    d = _drill([{"kind": "crash", "workers": [1], "at_step": 2}], min_test_accuracy=0.9)
    events = [
        ev(0.1, M, "worker-1", "worker joined"),
        ev(1.0, F, "worker-1", "crash injected: SIGKILL pid 7", 2, FaultKind.CRASH),
        ev(1.1, D, "worker-1", "worker lost: ActorDiedError\n\tclass_name: Worker", 3),
        ev(1.5, D, "worker-2", "worker lost: ActorDiedError", 4),
    ]
    records: list[Any] = [
        step(t, n, loss=2.0 / (n + 1), b_hat=0.1, b_hat_max=0.1, bound=1.0)
        for n, t in enumerate([0.5, 1.0, 1.2, 1.4, 1.6, 2.0])
    ]
    records.append(
        EvalRecord(
            seq=999,
            step=5,
            time_s=2.0,
            wall_time=T0 + 2.0,
            workers=4,
            metrics={"test_accuracy": 0.96},
        )
    )
    lines = "".join(json.dumps(r.to_dict()) + "\n" for r in records)
    (tmp_path / "metrics.jsonl").write_text(lines + '{"torn": ')  # a torn last line
    summary = {
        "state": "succeeded",
        "steps": 5,
        "total_steps": 5,
        "final_test_accuracy": 0.96,
        "steps_lost": 0,
        "events": [e.to_dict() for e in events],
        "consistency": {"b_hat_max": 0.1, "bound": 1.0},
    }
    kill = ExternalFault(wall_time=T0 + 1.45, target="worker-2", detail="SIGKILL of pid 8")
    rep = write_report(d, tmp_path, summary, external=[kill])
    assert rep["passed"], rep["checks"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["passed"] and on_disk["drill"] == "d"
    causes = {w["worker"]: (w["fault"], w["cause"]) for w in rep["recoveries"]["workers"]}
    assert causes == {
        "worker-1": ("crash", "crash injected: SIGKILL pid 7"),
        "worker-2": ("external", "SIGKILL of pid 8"),
    }
    (outside,) = [e for e in rep["events"] if e["source"] == "external"]
    assert outside["kind"] == "fault" and outside["fault"] == "external" and outside["step"] == 3
    md = (tmp_path / "report.md").read_text()
    assert "# Drill `d`: PASSED" in md and "Steps lost (after the last checkpoint): 0" in md
    assert "class_name" not in md  # multi-line details are cut to their first line
    assert "From outside the service at 1.45 s" in md
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_summary_is_a_failed_drill(tmp_path: Path) -> None:
    rep = write_report(_drill([]), tmp_path, None, error="TrainingFailed: gone")
    assert not rep["passed"] and rep["job_state"] == "failed"
    assert not (tmp_path / "report.png").exists()  # nothing to plot
    assert "**Error:** TrainingFailed: gone" in render_markdown(rep)


def test_every_shipped_drill_loads() -> None:
    drills = sorted((Path(__file__).resolve().parents[2] / "configs" / "drills").glob("*.yaml"))
    assert len(drills) >= 9
    for path in drills:
        assert load_drill(path).name == path.stem


def test_load_drill_refuses_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\njob: {steps: 0}\n")
    with pytest.raises(SpecError) as info:
        load_drill(bad)
    assert any(path.startswith("job.steps") for path, _ in info.value.problems)
    with pytest.raises(SpecError):
        load_drill(tmp_path / "missing.yaml")
