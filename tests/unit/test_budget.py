"""Budgets: the footprint estimate, the admit/pend/refuse policy, placement, the reaper's
choice — and the job manager acting on them (with a fake runner, no Ray)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fake_runner import FakeBackend, FakeCluster, Script

from actors.models import build_model, n_parameters
from core.errors import SpecError
from core.events import EventKind
from core.names import coordinator_name, worker_name
from core.spec import JobSpec, parse_spec
from service.budget import (
    GIB,
    NPZ_LOAD_FACTOR,
    WORKER_BASE_BYTES,
    Budgets,
    Usage,
    Verdict,
    decide,
    estimate,
    placement,
    refusals,
    usage_of,
    with_memory,
)
from service.jobs import JobManager
from service.reaper import orphans
from service.settings import Settings
from service.store import Store

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

# the settings' defaults
BUDGETS = Budgets(
    job_memory_bytes=8 * GIB,
    service_memory_bytes=16 * GIB,
    job_workers=64,
    service_processes=128,
)


def spec(**kw: Any) -> JobSpec:
    return parse_spec({"steps": 10, **kw})


# -- the estimate --------------------------------------------------------------------------


def test_parameters_are_counted_without_allocating_and_match_the_real_model() -> None:
    s = spec(model={"name": "mlp", "hidden": [32, 16]})
    torch.manual_seed(0)
    real = build_model(s.model, 64, 10, (8, 8))  # digits: 64 features, 10 classes
    assert estimate(s).parameters == n_parameters(real)
    c = spec(model={"name": "cnn", "hidden": [4, 8]})
    assert estimate(c).parameters == n_parameters(build_model(c.model, 64, 10, (8, 8)))


def test_a_huge_mlp_is_driven_by_model_hidden() -> None:
    t0 = time.monotonic()
    fp = estimate(spec(model={"name": "mlp", "hidden": [65536, 65536, 65536]}, workers=4))
    assert time.monotonic() - t0 < 1.0  # the meta device allocates nothing
    # 64*65536 + 2*65536^2 + 65536*10 weights, plus biases: 8.6e9
    assert fp.parameters > 8.5e9
    assert fp.driver == "model.hidden"
    assert fp.total_bytes > 4 * fp.parameters * 4  # several float32 copies


def test_a_generated_dataset_is_driven_by_n_samples() -> None:
    fp = estimate(
        spec(
            model={"name": "logreg"},
            dataset={"name": "least_squares", "n_samples": 2_000_000, "n_features": 1000},
        )
    )
    assert fp.driver == "dataset.n_samples"
    # drawn as float64, then float32 and standardised: 16 bytes a value at the peak
    assert fp.parts["dataset.n_samples"] == 2_000_000 * 1000 * 16
    assert fp.coordinator_bytes > fp.parts["dataset.n_samples"]  # the coordinator loads it


def test_logreg_size_is_driven_by_n_features() -> None:
    fp = estimate(
        spec(
            model={"name": "logreg"},
            dataset={
                "name": "synthetic_classification",
                "n_samples": 64,
                "n_features": 100_000,
                "n_classes": 10_000,
            },
        )
    )
    assert fp.parameters == 100_000 * 10_000 + 10_000
    assert fp.driver == "dataset.n_features"


def test_many_workers_are_driven_by_workers_and_count_processes() -> None:
    small = estimate(spec(workers=2))
    big = estimate(spec(workers=40, max_workers=60))
    assert big.driver == "workers"
    assert big.workers == 60 and big.processes == 61  # max_workers, plus the coordinator
    assert big.total_bytes - small.total_bytes >= 58 * WORKER_BASE_BYTES


def test_momentum_error_feedback_and_local_add_copies() -> None:
    base = estimate(spec())
    assert estimate(spec(optimizer={"momentum": 0.9})).coordinator_bytes > base.coordinator_bytes
    assert estimate(spec(compression={"name": "topk"})).worker_bytes > base.worker_bytes
    assert estimate(spec(mode={"name": "local"})).worker_bytes > base.worker_bytes
    assert estimate(spec(batch_size=4096)).worker_bytes > base.worker_bytes


def test_an_npz_dataset_counts_its_size_on_disk_and_its_shapes(tmp_path: Path) -> None:
    x = np.zeros((500, 6, 6), dtype=np.float32)
    y = np.arange(500, dtype=np.int64) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    s = spec(dataset={"name": "npz", "path": "d.npz"}, model={"name": "logreg"})
    fp = estimate(s, tmp_path)
    assert fp.parameters == 36 * 3 + 3  # 6x6 features, 3 classes
    assert fp.parts["dataset.path"] == NPZ_LOAD_FACTOR * (tmp_path / "d.npz").stat().st_size
    # a missing file costs nothing here: the data-path check refuses it
    assert estimate(s, tmp_path / "nowhere").parts["dataset.path"] == 0


# -- the policy ----------------------------------------------------------------------------


def test_over_the_job_memory_budget_is_refused_naming_field_budget_and_setting() -> None:
    s = spec(model={"name": "mlp", "hidden": [65536, 65536, 65536]}, workers=4)
    d = decide(s, estimate(s), BUDGETS, Usage())
    assert d.verdict is Verdict.REFUSE
    field, msg = d.problems[0]
    assert field == "model.hidden"
    assert "8.00 GiB" in msg and "ESGD_JOB_MEMORY_BYTES" in msg


def test_the_smaller_of_job_and_service_memory_budgets_applies() -> None:
    s = spec(workers=8)
    fp = estimate(s)
    tight = Budgets(10 * GIB, fp.total_bytes - 1, 64, 128)
    (problem,) = refusals(s, fp, tight)
    assert "ESGD_SERVICE_MEMORY_BYTES" in problem[1]


def test_workers_and_processes_budgets() -> None:
    s = spec(workers=65)
    fields = [f for f, _ in refusals(s, estimate(s), BUDGETS)]
    assert "workers" in fields
    s2 = spec(workers=10, max_workers=20)
    problems = refusals(s2, estimate(s2), Budgets(64 * GIB, 64 * GIB, 64, 16))
    assert problems[0][0] == "max_workers" and "ESGD_SERVICE_PROCESSES" in problems[0][1]


def test_within_budget_but_not_now_pends_with_the_reason() -> None:
    s = spec(workers=4)
    fp = estimate(s)
    assert decide(s, fp, BUDGETS, Usage()).verdict is Verdict.ADMIT
    full = Usage(memory_bytes=BUDGETS.service_memory_bytes - fp.total_bytes + 1)
    d = decide(s, fp, BUDGETS, full)
    assert d.verdict is Verdict.PEND and "waiting for memory" in d.reason
    busy = Usage(processes=BUDGETS.service_processes - 2)
    d = decide(s, fp, BUDGETS, busy)
    assert d.verdict is Verdict.PEND and "ESGD_SERVICE_PROCESSES" in d.reason
    assert usage_of([fp, fp]) == Usage(2 * fp.total_bytes, 2 * fp.processes)


def test_bundles_carry_each_actors_memory() -> None:
    fp = estimate(spec(workers=2))
    b = with_memory([{"CPU": 0.25}] * 3, fp)
    assert b[0] == {"CPU": 0.25, "memory": float(fp.coordinator_bytes)}
    assert b[1]["memory"] == b[2]["memory"] == float(fp.worker_bytes)


def test_placement_says_what_is_needed_and_what_the_cluster_has() -> None:
    need = {"CPU": 2.25, "memory": 2 * GIB}
    p = placement(need, {"CPU": 2.0, "memory": 8 * GIB}, {"CPU": 2.0, "memory": 8 * GIB})
    assert not p.now and not p.ever
    assert "CPU=2.25" in p.message and "CPU=2" in p.message and "in all" in p.message
    p = placement(need, {"CPU": 4.0, "memory": 8 * GIB}, {"CPU": 1.0, "memory": 8 * GIB})
    assert not p.now and p.ever and "free" in p.message
    assert placement(need, {"CPU": 4.0, "memory": 8 * GIB}, {"CPU": 4.0, "memory": 4 * GIB}).now


def test_worker_cpus_has_a_floor() -> None:
    with pytest.raises(SpecError) as ei:
        spec(workers=4096, resources={"worker_cpus": 0.0001})
    assert ei.value.problems[0][0] == "resources.worker_cpus"
    assert spec(resources={"worker_cpus": 0.05}).resources.worker_cpus == 0.05


# -- the reaper's choice -------------------------------------------------------------------


def test_orphans_are_the_actors_of_known_jobs_that_are_not_live() -> None:
    names = [
        coordinator_name("aaa"),
        worker_name("aaa", 0, 0),
        coordinator_name("bbb"),
        worker_name("bbb", 3, 2),
        worker_name("ccc", 1, 0),  # a worker whose coordinator is already gone
        coordinator_name("zzz"),  # a job of another service on the same cluster
        "someone-else",  # not a job's: left alone
    ]
    known = {"aaa", "bbb", "ccc"}
    assert orphans(names, {"aaa"}, known) == {
        "bbb": [coordinator_name("bbb"), worker_name("bbb", 3, 2)],
        "ccc": [worker_name("ccc", 1, 0)],
    }
    assert orphans(names, {"aaa", "bbb", "ccc"}, known) == {}


# -- the manager acting on them --------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[JobManager, FakeBackend, FakeCluster, Store]]:
    settings = Settings(
        state_dir=tmp_path / "state",
        data_dir=tmp_path / "data",
        poll_interval_s=0.01,
        service_memory_bytes=4 * GIB,
    )
    store = Store(settings.db_path)
    backend = FakeBackend()
    cluster = FakeCluster(cpus=64.0, node_cpus=64.0, backend=backend)
    mgr = JobManager(settings, store, backend=backend, cluster=cluster)
    yield mgr, backend, cluster, store
    mgr.stop()
    store.close()


def _state(store: Store, job_id: str) -> str:
    row = store.get_job(job_id)
    assert row is not None
    return row.state


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": {"name": "mlp", "hidden": [65536, 65536, 65536]}, "workers": 4}, "model.hidden"),
        (
            {
                "model": {"name": "logreg"},
                "dataset": {"name": "least_squares", "n_samples": 2_000_000, "n_features": 1000},
            },
            "dataset.n_samples",
        ),
        ({"workers": 100, "max_workers": 100}, "max_workers"),
    ],
)
def test_submit_refuses_a_job_over_budget_and_stores_nothing(
    env: tuple[Any, ...], body: dict[str, Any], field: str
) -> None:
    mgr, _, _, store = env
    with pytest.raises(SpecError) as ei:
        mgr.submit(spec(**body))
    assert field in [f for f, _ in ei.value.problems]
    assert store.list_jobs()[1] == 0


def test_a_job_past_the_service_memory_pends_with_the_reason_then_starts(
    env: tuple[Any, ...],
) -> None:
    mgr, backend, _, store = env
    backend.script = Script(steps_per_poll=1)
    # 6 workers: about 1.6 GiB each job; the service's budget here is 4 GiB
    first = [mgr.submit(spec(steps=1000, workers=6)) for _ in range(2)]
    third = mgr.submit(spec(steps=1000, workers=6))
    for _ in range(20):
        mgr.tick()
    assert [_state(store, j.id) for j in first] == ["running", "running"]
    assert _state(store, third.id) == "pending"
    row = store.get_job(third.id)
    assert row is not None and "waiting for memory" in row.status["waiting"]
    (wait,) = [e for e in store.events(third.id) if e.kind == "queued"]
    assert "ESGD_SERVICE_MEMORY_BYTES" in wait.detail
    mgr.cancel(first[0].id)
    for _ in range(50):
        mgr.tick()
        if _state(store, third.id) == "running":
            break
    assert _state(store, third.id) == "running"


def test_cancel_without_an_answer_kills_the_job_by_name_at_once(env: tuple[Any, ...]) -> None:
    mgr, backend, _, store = env
    backend.script = Script(steps_per_poll=1, cancel_error=TimeoutError("no answer"))
    job = mgr.submit(spec(steps=1000, workers=2))
    for _ in range(20):
        mgr.tick()
        if _state(store, job.id) == "running":
            break
    backend.named = [coordinator_name(job.id), worker_name(job.id, 0, 0), worker_name("x", 0, 0)]
    t0 = time.monotonic()
    row = mgr.cancel(job.id)
    assert time.monotonic() - t0 < 1.0
    assert row.state == "cancelled"
    assert sorted(backend.killed) == sorted([coordinator_name(job.id), worker_name(job.id, 0, 0)])
    assert backend.named == [worker_name("x", 0, 0)]  # another job's actor is not touched
    (last,) = [e for e in store.events(job.id) if e.kind == "state"][-1:]
    assert "cancelled by force" in last.detail and "killed its 2 actors" in last.detail


def test_the_reaper_kills_actors_of_no_live_job_with_an_event(env: tuple[Any, ...]) -> None:
    mgr, backend, _, store = env
    backend.script = Script(steps_per_poll=1)
    live = mgr.submit(spec(steps=1000, workers=2))
    done = mgr.submit(spec(steps=2, workers=2))
    for _ in range(40):
        mgr.tick()
        if _state(store, done.id) == "succeeded" and _state(store, live.id) == "running":
            break
    backend.named = [
        coordinator_name(live.id),
        worker_name(live.id, 0, 0),
        worker_name(done.id, 1, 0),  # outlived its job
        coordinator_name("unknown"),  # a job the store never knew: another service's
    ]
    reaped = mgr.reap()
    assert reaped == {done.id: [worker_name(done.id, 1, 0)]}
    assert backend.named == [
        coordinator_name(live.id),
        worker_name(live.id, 0, 0),
        coordinator_name("unknown"),
    ]
    (ev,) = [e for e in store.events(done.id) if e.kind == EventKind.REAP.value]
    assert worker_name(done.id, 1, 0) in ev.detail
    assert mgr.reap() == {}  # nothing left to reap
