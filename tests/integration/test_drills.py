"""The fault-injection drills of ``configs/drills/`` as integration tests on local Ray.

Each drill runs through :func:`service.drills.run.run_drill` (or, when its fault comes from
outside the service, through :class:`~service.runner.JobRunner` driven here and reported with
:func:`~service.drills.run.write_report`) on the session's Ray instance, and must pass its own
criteria: finished, test accuracy >= 0.95, B̂ within the analytic bound, every injected
fault an event. On top of the criteria each test checks what its fault should have done
(a replacement started, a partition healed, steps counted as lost, ...).

Starting actors is the costly part of a drill on this 2-core machine, so the drills run
:data:`CONCURRENT_JOBS` at a time from one pool (:func:`runs`), and each test waits for
its own; the resize drill, whose new workers must start within a few seconds of training,
runs alone at the end. Timings here are noisy (other engineers' tests share the cores), so
the tests check behaviour; the one timing the issue states (a worker's death to the next
applied update < 1 s) is checked with a generous margin (:data:`TEST_RECOVERY_S`), and the
real numbers are measured by ``bench/recovery.py``. The node-loss drill needs its own
multi-node Ray instance: it is in ``test_node_loss.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from core.spec import parse_spec
from service.drills.analyse import ExternalFault
from service.drills.run import run_drill, write_report
from service.drills.spec import DrillSpec, load_drill
from service.runner import JobRunner

pytestmark = pytest.mark.integration

DRILLS = Path(__file__).resolve().parents[2] / "configs" / "drills"
# Drills with a test of their own: sigkill_external (the test kills a worker), drop_20pct
# (run under both missing-gradient policies), scale_2_4_3 (alone, see the module doc),
# node_loss (test_node_loss.py removes a node).
OWN_TESTS = {"sigkill_external", "drop_20pct", "scale_2_4_3", "node_loss"}
PLANNED = sorted(p.stem for p in DRILLS.glob("*.yaml") if p.stem not in OWN_TESTS)
POLICIES = ("zero_fill", "own")
# The recovery target is 1 s (worker death -> next applied update, and detection);
# other engineers' tests share these 2 cores, so the tests allow 5x that.
TEST_RECOVERY_S = 5.0
# One drill: start-up of 4 workers (seconds when the machine is quiet, a minute when it is
# not) plus a few seconds of training; a test may also wait for the pool to reach it.
DRILL_TIMEOUT_S = 300
# Jobs at once: 3 x (coordinator 0.25 + 4 workers x 0.25 CPU) = 3.75 of the session's 4
# logical CPUs (a job whose actors do not fit would wait for the others).
CONCURRENT_JOBS = 3

Run = tuple[dict[str, Any], Path]  # a drill's report and its folder


def drill(name: str) -> DrillSpec:
    """A drill file with its recovery bounds widened to :data:`TEST_RECOVERY_S`."""
    d = load_drill(DRILLS / f"{name}.yaml")
    c = d.criteria
    update: dict[str, Any] = {}
    if c.max_recovery_s is not None:
        update["max_recovery_s"] = max(c.max_recovery_s, TEST_RECOVERY_S)
    if c.max_detect_s is not None:
        update["max_detect_s"] = max(c.max_detect_s, TEST_RECOVERY_S)
    return d.model_copy(update={"criteria": c.model_copy(update=update)})


def events_of(
    report: dict[str, Any], kind: str, target: str | None = None, fault: str | None = None
) -> list[dict[str, Any]]:
    """The report's events of one kind (an EventKind value), target and fault kind."""
    return [
        e
        for e in report["events"]
        if e["kind"] == kind
        and (target is None or e.get("target") == target)
        and (fault is None or e.get("fault") == fault)
    ]


def assert_passed(report: dict[str, Any], out: Path) -> None:
    """The drill passed, and what every drill must show holds on its own."""
    failed = [c for c in report["checks"] if c["passed"] is False]
    assert report["passed"], f"drill {report['drill']} failed: {failed} {report['error']}"
    s = report["summary"]
    assert s["state"] == "succeeded" and s["steps"] == s["total_steps"]
    assert s["final_test_accuracy"] >= 0.95
    cons = s["consistency"]
    # the verdict: mean B̂ within the bound frozen after the warm-up
    assert cons["bound"] is not None and cons["b_hat_mean"] <= cons["bound"]
    assert cons["verdict"] == "within" and cons["frozen_at_step"] is not None
    # every injected fault is an event
    missing = [f for f in report["faults"] if f["required"] and not f["recorded"]]
    assert not missing, f"faults without an event: {missing}"
    for name in ("report.json", "report.md", "report.png", "metrics.jsonl", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert "Steps lost (after the last checkpoint)" in (out / "report.md").read_text()


# -- what each planned drill must show beyond its criteria ----------------------------------


def _crash_one_of_four(r: dict[str, Any]) -> None:
    (loss,) = r["recoveries"]["workers"]
    assert loss["worker"] == "worker-1" and loss["fault"] == "crash"
    assert loss["replacement_started"]
    assert loss["next_update_after_s"] is not None
    assert loss["next_update_after_s"] <= TEST_RECOVERY_S
    assert r["summary"]["recovery_s"], "the runtime measured no recovery"
    assert max(r["summary"]["recovery_s"]) <= TEST_RECOVERY_S


def _crash_rejoin(r: dict[str, Any]) -> None:
    (fault,) = events_of(r, "fault", "worker-2", "crash")
    (detect,) = events_of(r, "detect", "worker-2")
    # after the loss, the next membership event of worker-2 starts its rejoin
    after = [
        e for e in events_of(r, "membership", "worker-2") if e["wall_time"] > detect["wall_time"]
    ]
    assert after, "no rejoin was started"
    # the planned rejoin waits rejoin_after_s = 0.5 s (no immediate replacement)
    assert after[0]["wall_time"] - fault["wall_time"] >= 0.5 - 0.05
    (loss,) = r["recoveries"]["workers"]
    assert loss["fault"] == "crash" and loss["replacement_started"]


def _partition_window(r: dict[str, Any]) -> None:
    heartbeat_s = r["spec"]["job"]["heartbeat_timeout_s"]
    # worker 1's 1 s window is shorter than the heartbeat timeout: never lost
    assert not events_of(r, "detect", "worker-1")
    assert events_of(r, "heal", "worker-1", "partition")
    # worker 2's 6 s window is longer: declared lost for want of a heartbeat, not before
    (lost,) = events_of(r, "detect", "worker-2")
    (cut,) = events_of(r, "fault", "worker-2", "partition")
    assert lost["wall_time"] - cut["wall_time"] >= heartbeat_s - 0.25
    (loss,) = r["recoveries"]["workers"]
    assert loss["worker"] == "worker-2" and loss["fault"] == "partition"


def _coordinator_crash(r: dict[str, Any]) -> None:
    s = r["summary"]
    assert s["restarts"] >= 1
    assert events_of(r, "restart", "coordinator")
    (crash,) = r["recoveries"]["coordinator"]
    assert crash["injected"]
    # planned at step 170 (the coordinator checks between replies, so it may fire a step
    # or two later), last checkpoint at 150 (every 50; a step or two later when several
    # steps complete at once): the steps since that checkpoint are done again
    assert 170 <= crash["crash_step"] < 200
    (fault,) = events_of(r, "fault", "coordinator", "coordinator_crash")
    ckpt = max(e["step"] for e in events_of(r, "checkpoint") if e["wall_time"] < fault["wall_time"])
    assert 150 <= ckpt < crash["crash_step"]
    assert crash["resumed_step"] == ckpt + 1
    assert r["steps_lost"] == crash["steps_lost"] == crash["crash_step"] - ckpt
    assert 0 < r["steps_lost"] <= 50  # checkpoint.interval_steps
    assert crash["resume_after_s"] is not None


def _heavy_tail_straggler(r: dict[str, Any]) -> None:
    (straggler,) = r["faults"]
    assert straggler["targets_seen"] == ["worker-3"]
    # the stalls were applied: the coordinator's timing sees them (mean 20 ms on 1 of 4
    # workers: ~5 ms per gradient over all)
    assert r["summary"]["timing"]["delay_ms"] > 1.0
    assert not events_of(r, "detect"), "a straggler is slow, not lost"


def _corrupt_gradient(r: dict[str, Any]) -> None:
    s = r["summary"]
    # worker 2's 50 steps of NaN gradients (the elastic rule may skip a few): each refused
    assert 40 <= s["gradients_corrupted"] <= 50
    assert s["gradients_refused_nonfinite"] == s["gradients_corrupted"]
    refused = events_of(r, "refused", "worker-2", "corrupt")
    assert len(refused) == s["gradients_refused_nonfinite"]
    # an event's step is the steps completed, which trail the gradient's step by at most
    # the elastic rule's max_lag (2)
    assert all(100 - 2 <= e["step"] < 150 for e in refused)
    assert not events_of(r, "detect"), "a corrupting worker is not lost"


EXTRA: dict[str, Callable[[dict[str, Any]], None]] = {
    "crash_one_of_four": _crash_one_of_four,
    "crash_rejoin": _crash_rejoin,
    "partition_window": _partition_window,
    "coordinator_crash": _coordinator_crash,
    "heavy_tail_straggler": _heavy_tail_straggler,
    "corrupt_gradient": _corrupt_gradient,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Run]]]:
    """Every pooled drill run, started at once, :data:`CONCURRENT_JOBS` at a time: the
    planned drills by name, ``sigkill_external`` and ``drop_20pct-<policy>``."""
    jobs: dict[str, Callable[[Path], Run]] = {
        name: (lambda out, name=name: (run_drill(drill(name), out), out)) for name in PLANNED
    }
    jobs["sigkill_external"] = run_sigkill_from_outside
    base = drill("drop_20pct")
    for policy in POLICIES:
        job = parse_spec({**base.job.model_dump(), "missing_policy": policy})
        d = base.model_copy(update={"name": f"{base.name}-{policy}", "job": job})
        jobs[d.name] = lambda out, d=d: (run_drill(d, out), out)
    # folders first, in this thread: tmp_path_factory is not thread-safe
    outs = {key: tmp_path_factory.mktemp(key) for key in jobs}
    with ThreadPoolExecutor(CONCURRENT_JOBS) as pool:
        futures = {key: pool.submit(fn, outs[key]) for key, fn in jobs.items()}
        try:
            yield futures
        finally:
            for f in futures.values():
                f.cancel()


@pytest.mark.timeout(DRILL_TIMEOUT_S)
@pytest.mark.parametrize("name", PLANNED)
def test_drill(name: str, runs: dict[str, Future[Run]]) -> None:
    report, out = runs[name].result()
    assert_passed(report, out)
    EXTRA[name](report)


def test_every_drill_file_is_tested() -> None:
    assert set(PLANNED) == set(EXTRA)
    assert {p.stem for p in DRILLS.glob("*.yaml")} >= OWN_TESTS


# -- faults from outside the service ---------------------------------------------------------


def run_sigkill_from_outside(out: Path) -> Run:
    """Start ``sigkill_external`` with JobRunner, SIGKILL a worker's process at step ~50
    (its pid from the job's status), run to the end; the report names the kill."""
    d = drill("sigkill_external")
    runner = JobRunner(f"sigkill-{uuid.uuid4().hex[:8]}", d.job, out, detached=False)
    kill: dict[str, Any] = {}
    try:
        runner.start()
        deadline = time.monotonic() + DRILL_TIMEOUT_S - 60
        while not kill:
            assert time.monotonic() < deadline, "the job never reached step 50"
            st = runner.poll().status
            assert st["state"] in ("starting", "running"), st
            live = [w for w in st["workers"] if w["state"] not in ("starting", "dead", "left")]
            if st["step"] >= 50 and live:
                victim = next((w for w in live if w["id"] == 1), live[0])
                kill = {"signal": "SIGKILL", "worker": victim["id"], "pid": victim["pid"]}
                kill.update(step=st["step"], wall_time=time.time())
                os.kill(victim["pid"], signal.SIGKILL)
            else:
                time.sleep(0.05)
        while not runner.done():
            assert time.monotonic() < deadline, "the job did not finish after the kill"
            runner.poll()
            time.sleep(0.1)
        summary = runner.finish()
    finally:
        if runner.actor is not None:
            with contextlib.suppress(Exception):
                runner.cancel()
            runner.release()
    external = ExternalFault(
        wall_time=kill["wall_time"],
        target=f"worker-{kill['worker']}",
        detail=f"SIGKILL of pid {kill['pid']} from the test",
    )
    return write_report(d, out, summary, external=[external], extra={"kill": kill}), out


@pytest.mark.timeout(DRILL_TIMEOUT_S)
def test_sigkill_from_outside(runs: dict[str, Future[Run]]) -> None:
    """A worker's process is SIGKILLed by someone else: noticed, replaced, job finishes."""
    report, out = runs["sigkill_external"].result()
    assert_passed(report, out)
    kill = report["kill"]
    heartbeat_s = report["spec"]["job"]["heartbeat_timeout_s"]
    target = f"worker-{kill['worker']}"
    detects = [
        e for e in events_of(report, "detect", target) if e["wall_time"] >= kill["wall_time"]
    ]
    assert detects, f"the kill of {target} (pid {kill['pid']}) was never detected"
    # actor-death notification, or the heartbeat deadline at the latest (+ margin)
    assert detects[0]["wall_time"] - kill["wall_time"] <= heartbeat_s + TEST_RECOVERY_S
    (loss,) = [w for w in report["recoveries"]["workers"] if w["worker"] == target]
    assert loss["fault"] == "external" and loss["replacement_started"]
    assert loss["detect_after_s"] is not None
    assert loss["next_update_after_s"] is not None
    assert loss["next_update_after_s"] <= heartbeat_s + TEST_RECOVERY_S


@pytest.mark.timeout(DRILL_TIMEOUT_S)
def test_drops_own_gives_smaller_mean_b_hat_than_zero_fill(runs: dict[str, Future[Run]]) -> None:
    """20% drops on every worker, same plan and seed, under two missing-gradient policies:
    both pass, and own (each worker's own gradient stands in) keeps the mean B̂, measured
    against the consistent sequence, below zero_fill's."""
    b_hat = {}
    for policy in POLICIES:
        report, out = runs[f"drop_20pct-{policy}"].result()
        assert_passed(report, out)
        assert report["spec"]["job"]["missing_policy"] == policy
        dropped = report["summary"]["dropped_gradients"]
        # 0.2 x 4 workers x 300 steps = ~240 expected; far from 0 either way
        assert dropped > 100
        assert len(events_of(report, "fault", fault="drop")) == dropped
        assert len(events_of(report, "missing", fault="drop")) == dropped
        assert report["summary"]["steps_all_lost"] == len(
            [e for e in events_of(report, "missing") if "every gradient lost" in e["detail"]]
        )
        b_hat[policy] = report["summary"]["consistency"]["b_hat_mean"]
    assert 0.0 < b_hat["own"] < b_hat["zero_fill"], b_hat


# -- resizing, alone -------------------------------------------------------------------------


@pytest.mark.timeout(DRILL_TIMEOUT_S)
def test_scale_2_4_3(runs: dict[str, Future[Run]], tmp_path: Path) -> None:
    """2 -> 4 -> 3 workers by the scale plan; runs after every pooled job has ended."""
    for f in runs.values():  # the new workers must not wait for other jobs' actors
        with contextlib.suppress(Exception):
            f.result()
    report = run_drill(drill("scale_2_4_3"), tmp_path)
    assert_passed(report, tmp_path)
    asked = [
        e["detail"] for e in events_of(report, "membership") if "scale requested" in e["detail"]
    ]
    assert asked == ["scale requested: 2 -> 4 workers", "scale requested: 4 -> 3 workers"]
    for wid in (2, 3):
        assert any(
            e["detail"].startswith("worker joined")
            for e in events_of(report, "membership", f"worker-{wid}")
        ), f"worker {wid} did not join before the next resize"
    removed = [e for e in events_of(report, "membership") if "removed on request" in e["detail"]]
    assert [e["target"] for e in removed] == ["worker-3"]
    assert report["summary"]["workers_final"] == 3
