"""The job state machine, admission policy, supervisor and reconcile — with a fake runner."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_runner import BoomError, FakeBackend, FakeCluster, FakeRunner, Script
from ray.exceptions import ActorDiedError
from ray_exception_objects import remote

from core.errors import InvalidRequest, InvalidTransition, JobNotFound, SpecError
from core.spec import FaultSpec, parse_spec
from service.jobs import (
    ALLOWED,
    JobManager,
    JobState,
    admit,
    check_transition,
    fits,
    map_runner_state,
    parse_fault,
)
from service.settings import Settings
from service.store import Store

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


# -- the enum and the transition table ------------------------------------------------------


@pytest.mark.parametrize("state", list(JobState))
def test_terminal_states_have_no_way_out(state: JobState) -> None:
    assert state.terminal == (state in {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
    if state.terminal:
        assert ALLOWED[state] == frozenset()
    else:  # every live state can still fail or be cancelled
        assert {JobState.FAILED, JobState.CANCELLED} <= ALLOWED[state]


def test_illegal_transition_names_the_allowed_ones() -> None:
    check_transition("j", JobState.RUNNING, JobState.RECOVERING)
    with pytest.raises(InvalidTransition, match="allowed from succeeded: none"):
        check_transition("j", JobState.SUCCEEDED, JobState.RUNNING)
    with pytest.raises(InvalidTransition, match="pending to running"):
        check_transition("j", JobState.PENDING, JobState.RUNNING)


def test_runner_state_mapping() -> None:
    assert map_runner_state("running") is JobState.RUNNING
    assert map_runner_state("recovering") is JobState.RECOVERING
    assert map_runner_state("pending") is None  # only the service makes a job pending
    assert map_runner_state("exploded") is None
    assert map_runner_state(None) is None


# -- admission policy ----------------------------------------------------------------------


def test_fits_checks_totals_and_single_bundles_per_node() -> None:
    b = [{"CPU": 0.25}] * 5
    assert fits(b, {"CPU": 1.25})
    assert not fits(b, {"CPU": 1.2})
    assert not fits([{"GPU": 1.0}], {"CPU": 8.0})
    # 3 CPUs free in total, but spread over nodes of 1 CPU: a 2-CPU actor cannot be placed
    assert not fits([{"CPU": 2.0}], {"CPU": 3.0}, [{"CPU": 1.0}] * 3)
    assert fits([{"CPU": 1.0}], {"CPU": 3.0}, [{"CPU": 1.0}] * 3)


def test_admit_is_fifo_with_backfill() -> None:
    big = [{"CPU": 1.5}]
    small = [{"CPU": 0.5}]
    admitted, waiting = admit([("a", big), ("b", big), ("c", small), ("d", small)], {"CPU": 2.0})
    assert admitted == ["a", "c"]  # b does not fit after a; c backfills; d no longer fits
    assert waiting == ["b", "d"]


# -- the manager, driven tick by tick -------------------------------------------------------


SPEC = parse_spec(
    {"name": "t", "steps": 6, "workers": 2, "max_workers": 4, "dataset": {"name": "digits"}}
)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[JobManager, FakeBackend, FakeCluster, Store]]:
    settings = Settings(
        state_dir=tmp_path / "state",
        data_dir=tmp_path / "data",
        poll_interval_s=0.01,
        max_poll_failures=3,
    )
    store = Store(settings.db_path)
    backend = FakeBackend()
    cluster = FakeCluster(cpus=2.0, backend=backend)
    mgr = JobManager(settings, store, backend=backend, cluster=cluster)
    yield mgr, backend, cluster, store
    mgr.stop()
    store.close()


def until(mgr: JobManager, cond: Callable[[], bool], ticks: int = 200) -> None:
    for _ in range(ticks):
        mgr.tick()
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError("condition not reached")


def state_of(store: Store, job_id: str) -> str:
    row = store.get_job(job_id)
    assert row is not None
    return row.state


def test_job_runs_to_success_with_an_event_per_transition(env: tuple) -> None:
    mgr, backend, _, store = env
    job = mgr.submit(SPEC)
    assert job.state == "pending"
    until(mgr, lambda: state_of(store, job.id) == "succeeded")
    states = [e.target for e in store.events(job.id) if e.kind == "state"]
    assert states == ["pending", "starting", "running", "succeeded"]
    recs = store.metrics(job.id)
    assert [r["step"] for r in recs if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert len([r for r in recs if r["kind"] == "eval"]) == 3
    row = store.get_job(job.id)
    assert row is not None
    assert row.summary == {
        "final_test_accuracy": 0.97,
        "steps": 6,
        "state": "succeeded",
        "consistency": {"b_hat_max": 0.0, "b_hat_mean": 0.0, "bound": 0.0},
    }
    assert row.step == 6 and row.total_steps == 6 and row.finished_at is not None
    assert backend.runners[job.id].calls[-1] == "finish"
    assert mgr.model_bytes(job.id) == b"fake-model-" + job.id.encode()


def test_replayed_polls_do_not_duplicate_history(env: tuple) -> None:
    mgr, backend, _, store = env
    backend.script = Script(resend_last=True)
    job = mgr.submit(SPEC)
    until(mgr, lambda: state_of(store, job.id) == "succeeded")
    seqs = [r["seq"] for r in store.metrics(job.id)]
    assert seqs == sorted(set(seqs)) and len(seqs) == 9


def test_job_waits_in_pending_and_asks_the_autoscaler(env: tuple) -> None:
    mgr, backend, cluster, store = env
    cluster.cpus = 0.5  # the job needs 0.25 + 2 x 0.25 = 0.75
    job = mgr.submit(SPEC)
    for _ in range(5):
        mgr.tick()
    assert state_of(store, job.id) == "pending"
    # CPUs only: the autoscaler is not asked for Ray's memory resource (service.jobs)
    want = [{"CPU": 0.25}] * 3
    # asked once, not on every tick (after the first round's withdrawal of any request an
    # earlier service process may have left standing)
    assert cluster.requests in ([want], [[], want]), cluster.requests
    waits = [e for e in store.events(job.id) if e.kind == "resources"]
    assert len(waits) == 1 and "CPU=0.75" in waits[0].detail
    asked = len(cluster.requests)
    cluster.cpus = 2.0  # the autoscaler added a node
    backend.script = Script(steps_per_poll=1)
    until(mgr, lambda: state_of(store, job.id) == "running")
    # the running job's bundles stay asked for: the autoscaler keeps its nodes (an idle
    # node is removed before the job's actors land on it otherwise)
    assert cluster.requests[asked - 1 :] == [want], cluster.requests
    until(mgr, lambda: state_of(store, job.id) == "succeeded")
    mgr.tick()
    assert cluster.requests[-1] == []  # request withdrawn once nothing is live or waiting


def test_several_jobs_run_at_once(env: tuple) -> None:
    mgr, backend, _cluster, store = env
    backend.script = Script(steps_per_poll=1)
    a, b = mgr.submit(SPEC), mgr.submit(SPEC)
    until(mgr, lambda: state_of(store, a.id) == "running" and state_of(store, b.id) == "running")
    until(mgr, lambda: {state_of(store, a.id), state_of(store, b.id)} == {"succeeded"})


def test_only_jobs_that_fit_start(env: tuple) -> None:
    mgr, backend, cluster, store = env
    backend.script = Script(steps_per_poll=1)
    cluster.cpus = 1.0  # one 0.75-CPU job fits, not two
    a, b = mgr.submit(SPEC), mgr.submit(SPEC)
    until(mgr, lambda: state_of(store, a.id) == "running")
    assert state_of(store, b.id) == "pending"
    until(mgr, lambda: state_of(store, b.id) == "succeeded", ticks=500)


def test_cancel_pending_running_and_finished(env: tuple) -> None:
    mgr, backend, cluster, store = env
    cluster.cpus = 0.0
    pend = mgr.submit(SPEC)
    assert mgr.cancel(pend.id).state == "cancelled"
    cluster.cpus = 2.0
    backend.script = Script(steps_per_poll=1)
    live = mgr.submit(parse_spec({"steps": 1000, "workers": 2}))
    until(mgr, lambda: state_of(store, live.id) == "running")
    mgr.cancel(live.id)
    assert "cancel" in backend.runners[live.id].calls
    until(mgr, lambda: state_of(store, live.id) == "cancelled")
    assert any(e.kind == "cancel" for e in store.events(live.id))
    with pytest.raises(InvalidTransition, match="already cancelled"):
        mgr.cancel(live.id)
    with pytest.raises(JobNotFound):
        mgr.cancel("0000")


def test_scale_and_inject_check_state_and_range(env: tuple) -> None:
    mgr, backend, cluster, store = env
    cluster.cpus = 0.0
    job = mgr.submit(parse_spec({"steps": 1000, "workers": 2, "max_workers": 4}))
    with pytest.raises(InvalidTransition, match="only running or recovering"):
        mgr.scale(job.id, 3)
    cluster.cpus = 2.0
    backend.script = Script(steps_per_poll=1)
    until(mgr, lambda: state_of(store, job.id) == "running")
    with pytest.raises(SpecError) as ei:
        mgr.scale(job.id, 5)
    assert ei.value.problems[0][0] == "workers" and "max_workers (4)" in ei.value.problems[0][1]
    mgr.scale(job.id, 3)
    assert ("scale", 3) in backend.runners[job.id].calls
    with pytest.raises(SpecError, match="worker ids"):
        mgr.inject(job.id, FaultSpec(kind="crash", workers=[7]))
    mgr.inject(job.id, FaultSpec(kind="crash", workers=[1]))
    mgr.tick()
    kinds = [e.kind for e in store.events(job.id)]
    assert {"scale", "membership", "inject"} <= set(kinds)
    mgr.cancel(job.id)
    until(mgr, lambda: state_of(store, job.id) == "cancelled")
    with pytest.raises(InvalidTransition):
        mgr.scale(job.id, 2)


def test_start_error_fails_the_job_with_its_message(env: tuple) -> None:
    mgr, backend, _, store = env
    backend.script = Script(start_error=BoomError("dataset.path: no such file"))
    job = mgr.submit(SPEC)
    until(mgr, lambda: state_of(store, job.id) == "failed")
    row = store.get_job(job.id)
    assert row is not None and row.error is not None and "no such file" in row.error


def test_runner_failure_is_recorded_with_the_reason(env: tuple) -> None:
    mgr, backend, _, store = env
    backend.script = Script(end="failed", error="1 live workers < min_workers=2")
    job = mgr.submit(SPEC)
    until(mgr, lambda: state_of(store, job.id) == "failed")
    row = store.get_job(job.id)
    assert row is not None and "min_workers=2" in (row.error or "")


def test_lost_coordinator_fails_after_bounded_retries(env: tuple) -> None:
    mgr, backend, _, store = env
    job = mgr.submit(SPEC)
    until(mgr, lambda: state_of(store, job.id) == "running")
    backend.runners[job.id].script = Script(poll_error=RuntimeError("actor died"))
    until(mgr, lambda: state_of(store, job.id) == "failed")
    row = store.get_job(job.id)
    assert row is not None and "ESGD_MAX_POLL_FAILURES=3" in (row.error or "")
    assert backend.runners[job.id].calls.count("poll") >= 3


def test_a_cancelled_job_whose_coordinator_cannot_be_polled_is_cancelled_at_once(
    env: tuple,
) -> None:
    # the coordinator answered the cancel, then went down (Ray restarting it): the runner
    # does not resume a cancelled job's coordinator, so its polls fail from then on
    mgr, backend, _, store = env
    backend.script = Script(steps_per_poll=1)
    job = mgr.submit(parse_spec({"steps": 1000, "workers": 2}))
    until(mgr, lambda: state_of(store, job.id) == "running")
    runner = backend.runners[job.id]
    runner.script = Script(poll_error=RuntimeError("cancelled while Ray restarted it"))
    polls = runner.calls.count("poll")
    mgr.cancel(job.id)
    mgr.tick()
    row = store.get_job(job.id)
    assert row is not None and row.state == "cancelled", row
    assert "could not be polled after the cancel" in (row.error or "") + str(
        [e.detail for e in store.events(job.id)]
    )
    assert runner.calls.count("poll") == polls + 1  # the first failure, not the third


def test_model_bytes_needs_a_model(env: tuple) -> None:
    mgr, _backend, cluster, _store = env
    cluster.cpus = 0.0
    job = mgr.submit(SPEC)
    with pytest.raises(InvalidTransition, match="no model yet"):
        mgr.model_bytes(job.id)


def test_reconcile_reattaches_survivors_and_fails_the_lost(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "s", data_dir=tmp_path, poll_interval_s=0.01)
    store = Store(settings.db_path)
    spec = SPEC.model_dump(mode="json")
    for jid, state in (
        ("alive", "running"),
        ("gone", "running"),
        ("saved", "running"),
        ("unborn", "starting"),
        ("waiting", "pending"),
        ("done", "succeeded"),
    ):
        store.create_job(jid, "t", spec, tmp_path / jid, state=state)
    store.update_progress("saved", step=5)
    backend = FakeBackend()
    survivor = FakeRunner("alive", SPEC, tmp_path / "alive", backend.script)
    survivor.state, survivor.step = "running", 2
    backend.survivors["alive"] = survivor
    backend.checkpoints["saved"] = 3  # coordinator gone, a checkpoint at step 3 left
    backend.redone["saved"] = 4  # its journal reached step 7; the service had seen step 5
    mgr = JobManager(settings, store, backend=backend, cluster=FakeCluster(8.0))
    mgr.reconcile()
    gone = store.get_job("gone")
    assert gone is not None and gone.state == "failed"
    assert "no longer in Ray" in (gone.error or "") and "no valid checkpoint" in (gone.error or "")
    assert any(e.kind == "reattach" for e in store.events("alive"))
    assert state_of(store, "saved") == "recovering"
    resumed = [e.detail for e in store.events("saved") if e.kind == "resume"]
    assert len(resumed) == 1 and "checkpoint at step 3" in resumed[0]
    # the journal's count (what the coordinator will say), not the service's last poll
    assert "4 steps trained after it are trained again" in resumed[0]
    until(
        mgr,
        lambda: all(
            state_of(store, j) == "succeeded" for j in ("alive", "waiting", "saved", "unborn")
        ),
    )
    # a job that was still starting (no step, no checkpoint) is simply started again
    assert any("starting it again" in e.detail for e in store.events("unborn", kind="resume"))
    assert backend.runners["saved"].calls[0] == "start"  # restarted, from step 3
    states = [e.target for e in store.events("saved", kind="state")]
    assert states == ["running", "recovering", "running", "succeeded"]
    assert state_of(store, "done") == "succeeded"
    mgr.stop()
    store.close()


def test_supervisor_thread_drives_jobs_and_reports_health(env: tuple) -> None:
    mgr, _, _, store = env
    assert not mgr.healthy
    mgr.start()
    job = mgr.submit(SPEC)
    deadline = time.monotonic() + 10
    while state_of(store, job.id) != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state_of(store, job.id) == "succeeded"
    assert mgr.healthy


def test_npz_paths_must_exist_inside_the_data_dir(env: tuple, tmp_path: Path) -> None:
    mgr, *_ = env
    spec = parse_spec({"steps": 5, "dataset": {"name": "npz", "path": "mine.npz"}})
    with pytest.raises(SpecError, match="ESGD_DATA_DIR"):
        mgr.submit(spec)
    data = mgr.settings.data_dir
    data.mkdir(parents=True)
    outside = tmp_path / "secret.npz"
    outside.write_bytes(b"x")
    (data / "mine.npz").symlink_to(outside)  # a link that leads out of the data dir
    with pytest.raises(SpecError, match="inside the data directory"):
        mgr.submit(spec)
    (data / "mine.npz").unlink()
    (data / "mine.npz").write_bytes(b"x")
    assert mgr.submit(spec).state == "pending"


def test_parse_fault_reports_paths() -> None:
    with pytest.raises(SpecError) as ei:
        parse_fault({"kind": "meteor"})
    assert ei.value.problems[0][0] == "kind"
    with pytest.raises(SpecError):
        parse_fault(["crash"])
    assert parse_fault({"kind": "crash", "workers": [0]}).workers == [0]


def test_max_running_jobs_caps_admission(env: tuple) -> None:
    mgr, backend, cluster, store = env
    backend.script = Script(steps_per_poll=1)
    cluster.cpus = 100.0
    mgr.settings.max_running_jobs = 0  # paused: accepted, never started
    a = mgr.submit(SPEC)
    for _ in range(3):
        mgr.tick()
    assert state_of(store, a.id) == "pending"
    assert any("ESGD_MAX_RUNNING_JOBS" in e.detail for e in store.events(a.id))
    mgr.settings.max_running_jobs = 1
    b = mgr.submit(SPEC)
    until(mgr, lambda: state_of(store, a.id) == "running")
    assert state_of(store, b.id) == "pending"  # one at a time
    until(mgr, lambda: state_of(store, b.id) == "succeeded", ticks=500)


def test_runtime_errors_reach_the_caller_unwrapped(env: tuple) -> None:
    mgr, backend, _, store = env
    backend.script = Script(steps_per_poll=1)
    job = mgr.submit(parse_spec({"steps": 1000, "workers": 2, "max_workers": 4}))
    until(mgr, lambda: state_of(store, job.id) == "running")
    runner = backend.runners[job.id]

    refused = InvalidRequest("scale: n=3 is outside [...]; set max_workers")

    def refuse(_n: int) -> None:  # Ray's wrapper of an error the coordinator raised
        raise remote(refused)

    runner.scale = refuse  # type: ignore[method-assign]
    with pytest.raises(InvalidRequest, match="set max_workers") as ei:
        mgr.scale(job.id, 3)
    assert ei.value is refused and "Traceback" not in str(ei.value)

    def dead(_n: int) -> None:
        raise ActorDiedError()

    runner.scale = dead  # type: ignore[method-assign]
    with pytest.raises(InvalidTransition, match="did not answer") as ei2:
        mgr.scale(job.id, 3)
    assert str(ei2.value) == (
        f"job {job.id}: scale failed because its coordinator did not answer: ActorDiedError: "
        "The actor died unexpectedly before finishing this task; the job may be ending — "
        f"check GET /jobs/{job.id}"
    )


def test_pending_jobs_are_worked_out_once_not_every_tick(
    env: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr, backend, cluster, store = env
    mgr.settings.max_running_jobs = 1
    backend.script = Script(steps_per_poll=1)
    cluster.cpus = 100.0
    # one job the store knew before this manager (as after a restart): read back once
    long = SPEC.model_copy(update={"steps": 10_000})
    store.create_job("old", "t", long.model_dump(mode="json"), Path("/tmp/old"))
    spec_reads: list[str] = []
    sized: list[str] = []
    real_spec_of, real_resources = mgr.spec_of, backend.resources
    monkeypatch.setattr(mgr, "spec_of", lambda j: spec_reads.append(j) or real_spec_of(j))
    monkeypatch.setattr(backend, "resources", lambda s: sized.append(s.name) or real_resources(s))
    jobs = [mgr.submit(SPEC.model_copy(update={"name": f"n{i}"})) for i in range(5)]
    for _ in range(10):
        mgr.tick()
    assert spec_reads == ["old"]  # submitted specs are kept from the submission
    assert state_of(store, "old") != "pending"  # oldest first
    assert all(state_of(store, j.id) == "pending" for j in jobs)
    # each pending job sized once (plus the starting/live ones re-sized for the reservation)
    assert all(sized.count(f"n{i}") == 1 for i in range(5))


def test_a_burst_of_submissions_does_not_poll_live_jobs(env: tuple) -> None:
    """A submission wakes an admission round only; live jobs are polled on the interval."""
    mgr, backend, cluster, store = env
    mgr.settings.poll_interval_s = 0.5
    mgr.settings.max_running_jobs = 1
    backend.script = Script(steps_per_poll=1)
    cluster.cpus = 100.0
    long = mgr.submit(SPEC.model_copy(update={"steps": 10_000}))
    mgr.start()
    deadline = time.monotonic() + 10
    while state_of(store, long.id) != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    runner = backend.runners[long.id]
    polls0, t0 = runner.calls.count("poll"), time.monotonic()
    queued = [mgr.submit(SPEC) for _ in range(40)]
    # every one is told promptly why it waits (an admission round, not the next poll)
    while time.monotonic() - t0 < 0.4:
        if all(any(e.kind == "queued" for e in store.events(j.id)) for j in queued):
            break
        time.sleep(0.01)
    assert all(any(e.kind == "queued" for e in store.events(j.id)) for j in queued)
    elapsed = time.monotonic() - t0
    polls = runner.calls.count("poll") - polls0
    assert polls <= elapsed / 0.5 + 1, f"{polls} polls in {elapsed:.2f} s"


def test_a_lost_gcs_moves_jobs_to_recovering_and_resumes_them_on_a_new_ray(env: tuple) -> None:
    """Ray lost, service stays: 3 probes without an answer -> the running job is
    ``recovering`` with a ``ray`` event and ``ray_ready`` is False; the reconnection (a new
    instance: no coordinator survives) resumes the job from its checkpoint; it succeeds."""
    mgr, backend, _, store = env
    job = mgr.submit(SPEC.model_copy(update={"steps": 40}))
    until(mgr, lambda: state_of(store, job.id) == "running")
    backend.checkpoints[job.id] = 2
    backend.redone[job.id] = 1
    backend.gcs_up = False
    reconnect = backend.reconnect_ray
    seen_ready: list[bool] = []

    def observed_reconnect() -> str:
        seen_ready.append(mgr.ray_ready)  # not ready while it reconnects
        return reconnect()

    backend.reconnect_ray = observed_reconnect  # type: ignore[method-assign]
    for _ in range(2):  # two misses: a late answer, not a lost GCS
        mgr._last_probe = 0.0
        mgr.tick()
    assert mgr.ray_ready and backend.reconnects == 0
    mgr._last_probe = 0.0
    mgr.tick()  # the third: lost -> recovering, reconnect, resume from the checkpoint
    assert seen_ready == [False] and backend.reconnects == 1 and mgr.ray_ready
    ray_events = store.events(job.id, kind="ray")
    assert len(ray_events) == 1 and "stopped answering" in ray_events[0].detail
    (resumed,) = store.events(job.id, kind="resume")
    assert "Ray's GCS was lost" in resumed.detail and "checkpoint at step 2" in resumed.detail
    assert "1 steps trained after it are trained again" in resumed.detail
    until(mgr, lambda: state_of(store, job.id) == "succeeded")
    states = [e.target for e in store.events(job.id, kind="state")]
    assert states[-3:] == ["recovering", "running", "succeeded"], states


def test_a_gcs_that_does_not_answer_is_busy_until_30_probes_then_lost(env: tuple) -> None:
    """A probe that times out is not a refusal: a GCS too busy to accept (or a head host
    that is unreachable for a while) keeps its jobs running for 29 probes; the 30th gives
    up."""
    mgr, backend, _, store = env
    job = mgr.submit(SPEC.model_copy(update={"steps": 10_000}))
    until(mgr, lambda: state_of(store, job.id) == "running")
    backend.gcs_up, backend.gcs_silent = False, True
    for _ in range(29):
        mgr._last_probe = 0.0
        mgr.tick()
    assert mgr.ray_ready and backend.reconnects == 0
    assert state_of(store, job.id) == "running" and not store.events(job.id, kind="ray")
    backend.gcs_up = True  # it answers again: the count starts over
    mgr._last_probe = 0.0
    mgr.tick()
    backend.gcs_up = False
    for _ in range(29):
        mgr._last_probe = 0.0
        mgr.tick()
    assert mgr.ray_ready and backend.reconnects == 0
    mgr._last_probe = 0.0
    mgr.tick()  # 30 in a row: lost
    assert backend.reconnects == 1
    (ev,) = store.events(job.id, kind="ray")
    assert "no answer for 30 s" in ev.detail


def test_a_gcs_that_cannot_be_reached_again_keeps_the_service_not_ready(env: tuple) -> None:
    """The check fails when it should: a reconnection that fails leaves ``ray_ready`` False
    and the job ``recovering`` (not failed, not running), and is tried again."""
    mgr, backend, _, store = env
    job = mgr.submit(SPEC.model_copy(update={"steps": 40}))
    until(mgr, lambda: state_of(store, job.id) == "running")
    backend.gcs_up = False
    tries: list[int] = []

    def broken() -> str:
        tries.append(1)
        raise RuntimeError("no Ray here")

    backend.reconnect_ray = broken  # type: ignore[method-assign]
    for _ in range(5):
        mgr._last_probe = 0.0
        mgr.tick()
    assert not mgr.ray_ready and len(tries) == 3  # after the 3rd miss, every tick tries
    assert state_of(store, job.id) == "recovering"
