"""The job manager: one lifecycle state machine per job, driven by one supervisor loop.

::

    pending ──> starting ──> running <──> recovering
       │            │            │             │
       └────────────┴────────────┴─────────────┴──> succeeded | failed | cancelled

* :class:`JobState` is the enum; each member knows whether it is ``terminal``.
* :meth:`JobManager._transition` is the only place a job's state changes. It checks the
  move against :data:`ALLOWED`, writes the new state and a ``state`` event in one
  transaction (compare-and-set on the old state), and logs the reason.
* *Policies decide, the manager acts*: :func:`admit` (which pending jobs fit in the
  cluster's free resources) and :func:`map_runner_state` are pure and unit-tested; the
  supervisor thread wires them to Ray and to the store.
* The supervisor polls every live job's :class:`~service.runner.JobRunner` each
  ``poll_interval_s``, persists new metric records and events (deduplicated on the
  coordinator's ``seq``) *before* the next poll acknowledges them, and follows the runner's
  state. Jobs that do not fit wait in ``pending`` and the autoscaler is asked for them.
* On start-up :meth:`JobManager.reconcile` re-attaches every job that was live when the
  service stopped, or fails it with the reason.

The Ray side is behind two seams, :class:`Cluster` and :class:`RunnerBackend`, so that the
state machine and the policies can be tested without Ray.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from pydantic import ValidationError

from core.errors import ElasticSGDError, InvalidTransition, JobNotFound, SpecError, TrainingFailed
from core.events import Event, EventKind, Record
from core.names import coordinator_name, job_of_actor
from core.spec import FaultSpec, JobSpec, format_errors
from core.state import JobState
from service.budget import (
    Footprint,
    Usage,
    Verdict,
    decide,
    estimate,
    gib,
    refusals,
    usage_of,
    with_memory,
)
from service.public_errors import NO_REASON, public_error
from service.ray_conn import GcsProbe
from service.ray_errors import describe, own_error, user_error
from service.reaper import orphans
from service.settings import Settings
from service.store import JobRow, StaleState, Store, new_id
from service.tasks import runtime_env, validate_task

log = logging.getLogger(__name__)

T = TypeVar("T")


_ENDS = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# Every legal move. A fast job may finish between two polls, so starting may end directly.
ALLOWED: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.STARTING, JobState.FAILED, JobState.CANCELLED}),
    JobState.STARTING: frozenset({JobState.RUNNING, JobState.RECOVERING}) | _ENDS,
    JobState.RUNNING: frozenset({JobState.RECOVERING}) | _ENDS,
    JobState.RECOVERING: frozenset({JobState.RUNNING}) | _ENDS,
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def check_transition(job_id: str, current: JobState, new: JobState) -> None:
    """Raise :class:`InvalidTransition` unless ``current -> new`` is in :data:`ALLOWED`."""
    if new not in ALLOWED[current]:
        allowed = ", ".join(sorted(ALLOWED[current])) or "none (terminal state)"
        raise InvalidTransition(
            f"job {job_id} cannot go from {current} to {new} (allowed from {current}: {allowed})"
        )


def map_runner_state(state: object) -> JobState | None:
    """The job state that a runner status ``state`` string stands for (None: unknown)."""
    try:
        mapped = JobState(str(state))
    except ValueError:
        return None
    return None if mapped is JobState.PENDING else mapped


# -- resources (a pure policy) -------------------------------------------------------------

Bundle = Mapping[str, float]
_EPS = 1e-9  # Ray accounts fractional CPUs in 1e-4 units; anything smaller is rounding


def total_of(bundles: Sequence[Bundle]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def fits(
    bundles: Sequence[Bundle],
    available: Mapping[str, float],
    node_capacities: Sequence[Bundle] | None = None,
) -> bool:
    """Whether ``bundles`` fit in the cluster's free resources.

    The check is on totals (what :func:`ray.available_resources` gives), plus: every bundle
    must fit on at least one node's capacity, since an actor cannot span nodes.
    """
    need = total_of(bundles)
    if any(v > available.get(k, 0.0) + _EPS for k, v in need.items() if v > 0):
        return False
    if node_capacities:
        for b in bundles:
            if not any(
                all(v <= cap.get(k, 0.0) + _EPS for k, v in b.items() if v > 0)
                for cap in node_capacities
            ):
                return False
    return True


def admit(
    pending: Sequence[tuple[str, Sequence[Bundle]]],
    available: Mapping[str, float],
    node_capacities: Sequence[Bundle] | None = None,
) -> tuple[list[str], list[str]]:
    """Which pending jobs to start now, oldest first, with backfill.

    A job that does not fit does not block a smaller one behind it (backfill); each
    admitted job's resources are taken from ``available`` before the next is considered.

    Returns:
        (admitted job ids, waiting job ids), both in the order given.
    """
    free = dict(available)
    admitted: list[str] = []
    waiting: list[str] = []
    for job_id, bundles in pending:
        if fits(bundles, free, node_capacities):
            admitted.append(job_id)
            for k, v in total_of(bundles).items():
                free[k] = free.get(k, 0.0) - v
        else:
            waiting.append(job_id)
    return admitted, waiting


def describe_resources(res: Mapping[str, float]) -> str:
    keys = [
        k
        for k in sorted(res)
        if k in ("CPU", "GPU", "memory") or not k.startswith(("node:", "object_store"))
    ]
    return (
        ", ".join(f"{k}={gib(res[k]) if k == 'memory' else format(res[k], 'g')}" for k in keys)
        or "nothing"
    )


# -- seams to Ray ---------------------------------------------------------------------------


class PollLike(Protocol):
    records: list[Record]
    events: list[Event]
    status: dict[str, Any]


class RunnerLike(Protocol):
    """What the manager needs of :class:`service.runner.JobRunner`."""

    def start(self) -> object: ...
    def poll(self) -> PollLike: ...
    def scale(self, n: int) -> None: ...
    def inject(self, fault: FaultSpec) -> None: ...
    def cancel(self, timeout_s: float | None = None) -> None: ...
    def finish(self) -> dict[str, Any]: ...
    def model_bytes(self) -> bytes: ...


class RunnerBackend(Protocol):
    """Makes runners: the real one wraps ``JobRunner``; unit tests pass a fake."""

    def create(self, job_id: str, spec: JobSpec, out_dir: Path, data_dir: Path) -> RunnerLike: ...
    def attach(
        self, job_id: str, spec: JobSpec, out_dir: Path, data_dir: Path
    ) -> RunnerLike | None: ...
    def resumable(
        self, job_id: str, spec: JobSpec, out_dir: Path, data_dir: Path
    ) -> tuple[RunnerLike, int, int] | None: ...
    def resources(self, spec: JobSpec) -> list[dict[str, float]]: ...
    def actors(self) -> list[str]: ...
    def kill(self, names: list[str]) -> list[str]: ...
    def ray_alive(self) -> GcsProbe: ...
    def reconnect_ray(self) -> str: ...


class Cluster(Protocol):
    """The cluster's free resources and the autoscaler (see :mod:`service.ray_conn`)."""

    def available(self) -> dict[str, float]: ...
    def node_capacities(self) -> list[dict[str, float]]: ...
    def request(self, bundles: list[dict[str, float]]) -> None: ...


class RayRunnerBackend:
    """The real backend: :class:`service.runner.JobRunner` (imported when first used).

    Args:
        start_timeout_s: every phase of a job's start must end within it.
        runtime_env: Ray's runtime_env for every job's actors (service.tasks), or None.
    """

    def __init__(
        self,
        start_timeout_s: float = 120.0,
        runtime_env: dict[str, Any] | None = None,
        ray_address: str | None = None,
    ) -> None:
        self.start_timeout_s = start_timeout_s
        self.runtime_env = runtime_env
        self.ray_address = ray_address

    def create(self, job_id: str, spec: JobSpec, out_dir: Path, data_dir: Path) -> RunnerLike:
        from service.runner import JobRunner

        runner: RunnerLike = JobRunner(
            job_id,
            spec,
            out_dir,
            data_dir=data_dir,
            detached=True,
            start_timeout_s=self.start_timeout_s,
            runtime_env=self.runtime_env,
        )
        return runner

    def attach(
        self, job_id: str, spec: JobSpec, out_dir: Path, data_dir: Path
    ) -> RunnerLike | None:
        from service.runner import JobRunner

        runner: RunnerLike | None = JobRunner.attach(job_id, spec, out_dir, data_dir=data_dir)
        return runner

    def resumable(
        self, job_id: str, spec: JobSpec, out_dir: Path, data_dir: Path
    ) -> tuple[RunnerLike, int, int] | None:
        from service.runner import JobRunner

        found: tuple[RunnerLike, int, int] | None = JobRunner.resumable(
            job_id, spec, out_dir, data_dir=data_dir, runtime_env=self.runtime_env
        )
        return found

    def resources(self, spec: JobSpec) -> list[dict[str, float]]:
        from service.runner import JobRunner

        return [dict(b) for b in JobRunner.resources(spec)]

    def actors(self) -> list[str]:
        from service.runner import service_actors

        return service_actors()

    def kill(self, names: list[str]) -> list[str]:
        from service.runner import kill_actors

        return kill_actors(names)

    def ray_alive(self) -> GcsProbe:
        from service.ray_conn import gcs_reachable

        return gcs_reachable()

    def reconnect_ray(self) -> str:
        from service.ray_conn import reconnect

        return reconnect(self.ray_address)


# -- the manager ------------------------------------------------------------------------------


@dataclass
class _Live:
    """Supervisor-side bookkeeping of a job that has a runner."""

    runner: RunnerLike
    spec: JobSpec
    start: Future[object] | None = None  # None once start() returned (or when re-attached)
    since: float = field(default_factory=time.monotonic)
    seen_status: bool = False
    poll_failures: int = 0
    cancel_requested_at: float | None = None


# Seconds a cancelled job may take to stop by itself before it is stopped by force.
CANCEL_GRACE_S = 30.0
# Seconds past ESGD_START_TIMEOUT_S before a start that has not returned is abandoned (the
# runner's own timeout fires first, with the cause; this is the backstop).
START_BACKSTOP_S = 10.0
# Seconds between two admission rounds woken by submissions (a burst of POSTs costs one).
ADMIT_MIN_GAP_S = 0.05
# The first event of every job.
SUBMITTED = "submitted; waiting for resources"
# Seconds between two probes of Ray's GCS, and the misses in a row that mean it is gone:
# 3 refused connections (3 x 1 s: a killed GCS is found in ~3 s), or 30 probes without
# any answer (a GCS too busy to accept looks the same as a host that went away: 3 late
# answers are not enough to restart an embedded Ray and every job on it).
RAY_PROBE_EVERY_S = 1.0
RAY_LOST_AFTER = 3
RAY_SILENT_LOST_AFTER = 30


class JobManager:
    """Owns every job's lifecycle. Thread-safe; the API calls it from its worker threads.

    Args:
        settings: service settings (state/data directories, poll interval, bounds).
        store: persistence.
        backend: makes runners (default: the real Ray one).
        cluster: free resources and autoscaler requests (default: none, so every job fits;
            :meth:`start` is given the Ray one by the app).
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        backend: RunnerBackend | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.backend: RunnerBackend = backend or RayRunnerBackend(
            settings.start_timeout_s, runtime_env(settings), settings.ray_address
        )
        self.cluster = cluster
        self._live: dict[str, _Live] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="esgd-start")
        # what the autoscaler was last asked for; None until this process asked (a request
        # an earlier service process left standing is replaced on the first round)
        self._requested: list[dict[str, float]] | None = None
        self._announced_wait: set[str] = set()
        # Pending jobs' specs and resource bundles, worked out once per job (not every tick).
        self._pending: dict[str, tuple[JobSpec, list[dict[str, float]] | None]] = {}
        # A full tick (poll every live job) is due at once, not only an admission round.
        self._poll_now = False
        self._last_tick = 0.0
        self._last_admit = 0.0
        # each job's estimated footprint (service.budget), worked out once, at submission
        self._footprints: dict[str, Footprint] = {}
        self._last_reap = time.monotonic()
        self.on_terminal: list[Callable[[JobRow], None]] = []
        # Ray's GCS: probed every RAY_PROBE_EVERY_S; lost after RAY_LOST_AFTER refusals or
        # RAY_SILENT_LOST_AFTER misses in a row; ``ray_ready`` is False from then until a
        # new connection is made (/readyz)
        self.ray_ready = True
        self._ray_misses = 0  # probes in a row that failed
        self._ray_refusals = 0  # of those, the refusals at the end of the run
        self._last_probe = 0.0

    # -- life of the manager ----------------------------------------------------------

    def start(self, cluster: Cluster | None = None) -> None:
        """Reconcile the store with Ray, then start the supervisor thread."""
        if cluster is not None:
            self.cluster = cluster
        self.reconcile()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="esgd-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop supervising. Jobs keep running in Ray (they are detached) and are
        re-attached by the next :meth:`reconcile`."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        """The supervisor thread is alive and ticked recently (for ``/readyz``)."""
        t = self._thread
        if t is None or not t.is_alive():
            return False
        # a tick can take a start() call (a few seconds); 30 s without one means stuck
        return time.monotonic() - self._last_tick < max(30.0, 20 * self.settings.poll_interval_s)

    # -- requests from the API --------------------------------------------------------

    def submit(self, spec: JobSpec, *, drill_id: str | None = None) -> JobRow:
        """Accept a job: check what can be checked without Ray, persist it as ``pending``.

        Raises:
            SpecError: the spec's data file is missing or outside the data directory.
        """
        job_id, out_dir, fp = self._new_job(spec)
        row = self.store.create_job(
            job_id,
            spec.name,
            spec.model_dump(mode="json"),
            out_dir,
            drill_id=drill_id,
            detail=SUBMITTED,
        )
        return self._submitted(row, spec, fp)

    async def submit_async(self, spec: JobSpec) -> JobRow:
        """:meth:`submit` for a coroutine: ``POST /jobs`` stays on the event loop, which
        awaits the commit instead of holding a pool thread (a thread waiting for the GIL
        behind a busy event loop made submissions 10x slower than reads under load)."""
        job_id, out_dir, fp = self._new_job(spec)
        row = await self.store.create_job_async(
            job_id, spec.name, spec.model_dump(mode="json"), out_dir, detail=SUBMITTED
        )
        return self._submitted(row, spec, fp)

    def _new_job(self, spec: JobSpec) -> tuple[str, Path, Footprint]:
        self.check_data_path(spec)
        self.check_task(spec)
        fp = self.check_budget(spec)
        job_id = new_id()
        return job_id, self.settings.runs_dir / job_id, fp

    def _submitted(self, row: JobRow, spec: JobSpec, fp: Footprint) -> JobRow:
        with self._lock:
            self._pending[row.id] = (spec, None)
            self._footprints[row.id] = fp
        log.info("job %s (%s) submitted", row.id, spec.name)
        self._wake.set()  # an admission round, not a poll of every live job
        return row

    def check_task(self, spec: JobSpec) -> None:
        """A job's task must be under the allowed module prefixes (checked before anything is
        imported), resolve, and accept its params (service.tasks)."""
        if spec.task is not None:
            validate_task(spec.task, self.settings)

    def check_data_path(self, spec: JobSpec) -> None:
        """An ``npz`` dataset must name an existing file inside ``settings.data_dir``."""
        if spec.dataset.name != "npz" or spec.dataset.path is None:
            return
        root = self.settings.data_dir.resolve()
        try:
            target = (root / spec.dataset.path).resolve()
            inside, is_file = target.is_relative_to(root), target.is_file()
        except (OSError, ValueError, RuntimeError) as exc:
            # a symlink loop (RuntimeError before Python 3.13), an embedded NUL (ValueError),
            # a name too long for the filesystem or any other OSError: the user's to fix
            raise SpecError([("dataset.path", _unusable_path(exc))]) from None
        if not inside:
            raise SpecError([("dataset.path", f"must stay inside the data directory {root}")])
        if not is_file:
            raise SpecError(
                [
                    (
                        "dataset.path",
                        f"no file {spec.dataset.path!r} in the data directory {root} "
                        "(copy it there, or set ESGD_DATA_DIR)",
                    )
                ]
            )

    # -- budgets (service.budget) ----------------------------------------------------------

    def footprint(self, spec: JobSpec) -> Footprint:
        """What ``spec`` will hold once started (nothing is allocated to find out).

        Raises:
            SpecError: the model cannot be built for its data (as the coordinator would say).
        """
        try:
            return estimate(spec, self.settings.data_dir)
        except SpecError:
            raise
        except ElasticSGDError as exc:
            raise SpecError([("model", str(exc))]) from None

    def check_budget(self, spec: JobSpec) -> Footprint:
        """Refuse a job over a per-job or service budget; returns its footprint.

        Raises:
            SpecError: one ``(spec field, message)`` per budget exceeded, naming the field
                that drives it, the budget and the setting that holds it.
        """
        fp = self.footprint(spec)
        problems = refusals(spec, fp, self.settings.budgets)
        if problems:
            raise SpecError(problems)
        return fp

    def _footprint_of(self, job_id: str, spec: JobSpec) -> Footprint:
        with self._lock:
            fp = self._footprints.get(job_id)
        if fp is None:
            fp = self.footprint(spec)
            with self._lock:
                self._footprints[job_id] = fp
        return fp

    def _in_use(self) -> Usage:
        """What the jobs with actors hold (their footprints' sum)."""
        with self._lock:
            live = list(self._live.items())
        return usage_of([self._footprint_of(job_id, e.spec) for job_id, e in live])

    def get(self, job_id: str) -> JobRow:
        row = self.store.get_job(job_id)
        if row is None:
            raise _unknown(job_id)
        return row

    def version(self, job_id: str) -> float:
        """When the job last changed (see :meth:`Store.job_version`).

        Raises:
            JobNotFound: unknown id.
        """
        version = self.store.job_version(job_id)
        if version is None:
            raise _unknown(job_id)
        return version

    def spec_of(self, job_id: str) -> JobSpec:
        data = self.store.get_spec(job_id)
        if data is None:
            raise _unknown(job_id)
        return JobSpec.model_validate(data)

    def cancel(self, job_id: str) -> JobRow:
        """Stop a job. Pending jobs end at once; live ones when their coordinator stops.

        Raises:
            JobNotFound, InvalidTransition: unknown job, or already finished.
        """
        for _ in range(3):  # the supervisor may move the job meanwhile: retry on a stale read
            row = self.get(job_id)
            state = JobState(row.state)
            if state.terminal:
                raise InvalidTransition(
                    f"job {job_id} already {state}; only pending, starting, running or "
                    "recovering jobs can be cancelled"
                )
            if state is JobState.PENDING:
                try:
                    return self._transition(
                        job_id, state, JobState.CANCELLED, "cancelled on request"
                    )
                except StaleState:
                    continue
            with self._lock:
                live = self._live.get(job_id)
                first = live is not None and live.cancel_requested_at is None
                if live is not None and live.cancel_requested_at is None:
                    live.cancel_requested_at = time.monotonic()
            if live is None:
                try:
                    return self._transition(
                        job_id,
                        state,
                        JobState.CANCELLED,
                        "cancelled on request (no live coordinator)",
                        finished=True,
                    )
                except StaleState:
                    continue
            if first:
                self.store.add_event(job_id, "cancel", "cancel requested", step=row.step)
                forced = self._ask_cancel(job_id, live)
                if forced is not None:
                    return forced
            self._poll_now = True
            self._wake.set()
            return self.get(job_id)
        raise InvalidTransition(f"job {job_id} changed state repeatedly; try again")

    def _ask_cancel(self, job_id: str, live: _Live) -> JobRow | None:
        """Ask the coordinator to stop, waiting ``cancel_timeout_s`` at most; if it does not
        answer (it is restarting, or still being built), stop the job by force. Returns the
        job's row if it was stopped by force, else ``None`` (it stops by itself)."""
        timeout_s = self.settings.cancel_timeout_s
        try:
            live.runner.cancel(timeout_s)
        except Exception as exc:  # noqa: BLE001 - any Ray error is data: recorded below
            log.warning("job %s: cancel not answered: %r", job_id, exc)
            return self._force_cancel(
                job_id, f"its coordinator did not answer within {timeout_s:g} s"
            )
        return None

    def _kill_job(self, job_id: str) -> list[str]:
        """Kill the job's coordinator and every worker by name (best effort)."""
        try:
            names = [n for n in self.backend.actors() if job_of_actor(n) == job_id]
            killed = self.backend.kill(names) if names else []
        except Exception as exc:  # noqa: BLE001 - any Ray error is data: recorded below
            log.warning("job %s: killing its actors failed: %r", job_id, exc)
            return []
        if killed:
            log.info("job %s: killed %d actors: %s", job_id, len(killed), ", ".join(killed))
        return killed

    def _force_cancel(self, job_id: str, why: str) -> JobRow:
        """Kill the job's actors by name and record it cancelled (whatever state its
        coordinator is in); the reaper sweeps up an actor created after the kill."""
        killed = self._kill_job(job_id)
        reason = f"cancelled by force: {why}; killed its {len(killed)} actors"
        for _ in range(3):
            row = self.get(job_id)
            state = JobState(row.state)
            if state.terminal:
                return row
            try:
                return self._transition(job_id, state, JobState.CANCELLED, reason, finished=True)
            except StaleState:
                continue
        return self.get(job_id)

    def scale(self, job_id: str, workers: int) -> JobRow:
        """Change the number of workers of a running job.

        Raises:
            JobNotFound, InvalidTransition, SpecError: bad id, state or count.
        """
        row, live = self._live_for_change(job_id, "scaled")
        lo, hi = live.spec.min_workers, live.spec.max_workers_or_workers
        if not lo <= workers <= hi:
            raise SpecError(
                [
                    (
                        "workers",
                        f"must be between min_workers ({lo}) and max_workers ({hi}) of job "
                        f"{job_id}; submit the job with a larger max_workers to grow it further",
                    )
                ]
            )
        try:
            self._call_runner(job_id, "scale", lambda: live.runner.scale(workers))
        except TrainingFailed as exc:
            # the coordinator refused the count itself (e.g. more shards than training rows)
            raise SpecError(
                [("workers", f"cannot scale job {job_id} to {workers}: {exc}")]
            ) from exc
        self.store.add_event(
            job_id, "scale", f"scale to {workers} workers requested", step=row.step
        )
        return self.get(job_id)

    def inject(self, job_id: str, fault: FaultSpec) -> JobRow:
        """Inject ``fault`` into a running job now.

        Raises:
            JobNotFound, InvalidTransition, SpecError: bad id, state or target.
        """
        row, live = self._live_for_change(job_id, "given faults")
        hi = live.spec.max_workers_or_workers
        if fault.workers and any(w >= hi for w in fault.workers):
            raise SpecError([("workers", f"worker ids of job {job_id} are < {hi}")])
        self._call_runner(job_id, "inject", lambda: live.runner.inject(fault))
        target = ",".join(map(str, fault.workers)) if fault.workers else None
        self.store.add_event(
            job_id, "inject", f"{fault.kind} fault requested", target=target, step=row.step
        )
        return self.get(job_id)

    def model_bytes(self, job_id: str) -> bytes:
        """The job's latest model of record (``torch.save`` of a state dict).

        Raises:
            JobNotFound, InvalidTransition: bad id, or no model exists (yet).
        """
        row = self.get(job_id)
        state = JobState(row.state)
        path = Path(row.out_dir) / "model.pt"
        if state.terminal:
            if path.is_file():
                return path.read_bytes()
            raise InvalidTransition(f"job {job_id} {state} without writing a model")
        with self._lock:
            live = self._live.get(job_id)
        if state.accepts_changes and live is not None and live.start is None:
            return self._call_runner(job_id, "model_bytes", live.runner.model_bytes)
        raise InvalidTransition(
            f"job {job_id} is {state}: no model yet; try again once it is running"
        )

    def _live_for_change(self, job_id: str, verb: str) -> tuple[JobRow, _Live]:
        row = self.get(job_id)
        state = JobState(row.state)
        with self._lock:
            live = self._live.get(job_id)
        if not state.accepts_changes or live is None or live.start is not None:
            raise InvalidTransition(
                f"job {job_id} is {state}; only running or recovering jobs can be {verb}"
            )
        if live.cancel_requested_at is not None:
            raise InvalidTransition(f"job {job_id} is being cancelled; it can no longer be {verb}")
        return row, live

    def _call_runner(self, job_id: str, what: str, fn: Callable[[], T]) -> T:
        """Call the runner; what it raises reaches the caller as :mod:`service.ray_errors`
        words it (our own errors as they are, anything else as an InvalidTransition)."""
        try:
            return fn()
        except Exception as exc:
            if own_error(exc) is None:
                log.warning("job %s: %s failed: %r", job_id, what, exc)
            raise user_error(
                exc,
                f"job {job_id}: {what} failed because its coordinator did not answer",
                error_type=InvalidTransition,
                advice=f"the job may be ending — check GET /jobs/{job_id}",
            ) from exc

    # -- the state machine ------------------------------------------------------------

    def _transition(
        self,
        job_id: str,
        current: JobState,
        new: JobState,
        reason: str,
        *,
        error: str | None = None,
        detail: str | None = None,
        step: int | None = None,
        finished: bool = False,
    ) -> JobRow:
        """The one place where a job changes state: check, persist with its event, log.

        A failed job always gets an ``error``: ``error`` (or else ``reason``) as
        :func:`~service.public_errors.public_error` words it; the full text (``detail``, or
        else the error as given) is kept for ``GET /jobs/{id}/error`` and logged.

        Raises:
            InvalidTransition: the move is not allowed.
            StaleState: the job left ``current`` meanwhile.
        """
        check_transition(job_id, current, new)
        full: str | None = None
        if new is JobState.FAILED or error is not None:
            full = detail or error or reason
            error, reason = public_error(error or reason), public_error(reason)
            log.error("job %s failed: %s", job_id, full)
        row = self.store.transition(
            job_id,
            current.value,
            new.value,
            detail=reason,
            error=error,
            error_detail=full,
            step=step,
            started=new is JobState.RUNNING,
            finished=finished or new.terminal,
        )
        log.info("job %s: %s -> %s (%s)", job_id, current, new, reason)
        if current is JobState.PENDING:
            with self._lock:
                self._pending.pop(job_id, None)
        if new.terminal:
            with self._lock:
                self._live.pop(job_id, None)
                self._footprints.pop(job_id, None)
                self._announced_wait.discard(job_id)
            for hook in list(self.on_terminal):
                try:
                    hook(row)
                except Exception:
                    log.exception("on_terminal hook failed for job %s", job_id)
        return row

    def _fail(self, job_id: str, reason: str, exc: BaseException | None = None) -> None:
        """Fail a job from whatever non-terminal state it is in (best effort); ``exc``'s
        traceback, if given, is kept with the reason for operators."""
        for _ in range(3):
            row = self.store.get_job(job_id)
            if row is None or JobState(row.state).terminal:
                return
            try:
                self._transition(
                    job_id,
                    JobState(row.state),
                    JobState.FAILED,
                    reason,
                    error=reason,
                    detail=None if exc is None else _with_traceback(reason, exc),
                    step=row.step,
                )
                return
            except StaleState:
                continue

    # -- start-up reconcile -------------------------------------------------------------

    def reconcile(self, why: str | None = None) -> None:
        """Bring every non-terminal job the store knows back under supervision.

        ``why`` says what happened, in the events of the jobs that resume (default: the
        service restarted).

        Pending jobs wait again. A live one is re-attached to its coordinator if that still
        runs in Ray; if the coordinator is gone (it ran in the service's own Ray instance,
        which died with the service, or it crashed) the job resumes from its latest valid
        checkpoint; without one it is failed with the reason.
        """
        rows, _ = self.store.list_jobs(
            states=[s.value for s in JobState if s.live], limit=1_000_000, newest_first=False
        )
        for row in rows:
            try:
                spec = self.spec_of(row.id)
            except (ValidationError, JobNotFound) as exc:
                self._fail(row.id, f"its stored spec no longer validates: {exc}")
                continue
            out_dir = Path(row.out_dir)
            try:
                runner = self.backend.attach(row.id, spec, out_dir, self.settings.data_dir)
            except Exception as exc:  # noqa: BLE001 - any Ray error is data: recorded below
                log.warning("job %s: attach failed: %r", row.id, exc)
                runner = None
            if runner is None:
                self._resume(row, spec, why)
                continue
            with self._lock:
                self._live[row.id] = _Live(runner=runner, spec=spec, seen_status=True)
            self.store.add_event(
                row.id,
                "reattach",
                f"service restarted; re-attached to coordinator {coordinator_name(row.id)}",
                step=row.step,
            )
            log.info("job %s re-attached (%s)", row.id, row.state)

    def _resume(self, row: JobRow, spec: JobSpec, why: str | None = None) -> None:
        """Restart a live job whose coordinator is gone from its latest valid checkpoint."""
        gone = (
            f"{why or 'the service restarted'} and coordinator {coordinator_name(row.id)} is "
            "no longer in Ray (it ran in the service's own Ray instance, or it crashed)"
        )
        try:
            found = self.backend.resumable(row.id, spec, Path(row.out_dir), self.settings.data_dir)
        except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is data
            log.warning("job %s: looking for a checkpoint failed: %r", row.id, exc)
            found = None
        if found is None:
            if JobState(row.state) is JobState.STARTING and row.step == 0:
                # it never trained: nothing to lose by starting it again from scratch
                self.store.add_event(
                    row.id, "resume", f"{gone} before it trained; starting it again", step=0
                )
                self._launch(row.id, spec, Path(row.out_dir))
            else:
                self._fail(
                    row.id,
                    f"{gone}, and it left no valid checkpoint to resume from (set "
                    "checkpoint.interval_steps or checkpoint.interval_s in the spec); "
                    "resubmit it",
                )
            return
        runner, ckpt_step, redone = found
        reason = (
            f"{gone}; resuming from its checkpoint at step {ckpt_step} ({redone} steps "
            f"trained after it are trained again; the service had seen step {row.step})"
        )
        current = JobState(row.state)
        try:
            if current is not JobState.RECOVERING:
                self._transition(
                    row.id,
                    current,
                    JobState.RECOVERING,
                    f"resuming from the checkpoint at step {ckpt_step}",
                    step=row.step,
                )
            self.store.add_event(row.id, "resume", reason, step=row.step)
        except (StaleState, InvalidTransition) as exc:
            log.warning("job %s: could not resume: %s", row.id, exc)
            return
        self._supervise(row.id, runner, spec)
        log.info("job %s resumes from its checkpoint at step %d", row.id, ckpt_step)

    # -- the supervisor -----------------------------------------------------------------

    def _loop(self) -> None:
        """Tick every ``poll_interval_s``; in between, a wake-up (a submission) runs only an
        admission round, at most every :data:`ADMIT_MIN_GAP_S`, so that a burst of
        submissions does not poll every live job's coordinator once per request."""
        interval = self.settings.poll_interval_s
        next_tick = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if self._poll_now or now >= next_tick:
                    self._poll_now = False
                    next_tick = now + interval
                    self.tick()
                elif now - self._last_admit >= ADMIT_MIN_GAP_S:
                    self._admit_pending()
                else:
                    # the wake-up stays set: sleep out the gap, then admit
                    self._stop.wait(ADMIT_MIN_GAP_S - (now - self._last_admit))
                    continue
            except Exception:
                log.exception("supervisor tick failed; retrying next interval")
            self._wake.wait(max(0.0, next_tick - time.monotonic()))
            self._wake.clear()

    def tick(self) -> None:
        """One supervisor round: check Ray, follow every live job, then admit pending ones."""
        self._last_tick = time.monotonic()
        if not self._ray_up():
            return
        with self._lock:
            live = list(self._live.items())
        for job_id, entry in live:
            if self._stop.is_set():
                return
            try:
                self._follow(job_id, entry)
            except Exception:
                log.exception("job %s: supervising failed", job_id)
        self._admit_pending()
        self._reap_if_due()

    # -- Ray lost, service stays (service.ray_conn) ---------------------------------------

    def _ray_up(self) -> bool:
        """Probe Ray's GCS when due; after :data:`RAY_LOST_AFTER` misses in a row, take the
        jobs off the lost instance and reconnect. False while Ray is not usable."""
        now = time.monotonic()
        if self.ray_ready and now - self._last_probe < RAY_PROBE_EVERY_S:
            return True
        self._last_probe = now
        probe = self.backend.ray_alive() if self.ray_ready else GcsProbe.REFUSED
        if probe is GcsProbe.UP:
            self._ray_misses = self._ray_refusals = 0
            return True
        self._ray_misses += 1
        self._ray_refusals = self._ray_refusals + 1 if probe is GcsProbe.REFUSED else 0
        lost = self._ray_refusals >= RAY_LOST_AFTER or self._ray_misses >= RAY_SILENT_LOST_AFTER
        if self.ray_ready and not lost:
            if probe is GcsProbe.NO_ANSWER and self._ray_misses in (RAY_LOST_AFTER, 10, 20):
                log.warning("Ray's GCS has not answered %d probes in a row", self._ray_misses)
            return True  # late answers are not a lost GCS: follow the jobs meanwhile
        if self.ray_ready:
            self._ray_lost()
        return self._ray_reconnect()

    def _ray_lost(self) -> None:
        """Ray's GCS is gone: every live job moves to ``recovering`` (its runner is dropped
        uncalled: calls into a dead instance hang) until Ray is back."""
        self.ray_ready = False
        misses_s = self._ray_misses * RAY_PROBE_EVERY_S
        log.error("Ray's GCS did not answer %d probes in a row: Ray is lost", self._ray_misses)
        with self._lock:
            lost, self._live = self._live, {}
        for job_id in lost:
            row = self.store.get_job(job_id)
            if row is None or JobState(row.state).terminal:
                continue
            self.store.add_event(
                job_id,
                "ray",
                f"Ray's GCS stopped answering (no answer for {misses_s:g} s); the job waits "
                "for a new connection and then resumes from its latest checkpoint",
                step=row.step,
            )
            current = JobState(row.state)
            if current is JobState.RUNNING:
                with suppress(StaleState, InvalidTransition):
                    self._transition(
                        job_id, current, JobState.RECOVERING, "Ray lost", step=row.step
                    )

    def _ray_reconnect(self) -> bool:
        """Connect to a new (embedded) or the returning (cluster) Ray, then bring the jobs
        back as a restart of the service does (:meth:`reconcile`)."""
        try:
            gcs = self.backend.reconnect_ray()
        except Exception:
            log.exception("reconnecting to Ray failed; trying again")
            return False
        self.ray_ready, self._ray_misses, self._ray_refusals = True, 0, 0
        log.warning("reconnected to Ray at %s; resuming the jobs", gcs)
        self.reconcile(why=f"Ray's GCS was lost and the service reconnected (now {gcs})")
        return True

    def _follow(self, job_id: str, entry: _Live) -> None:
        """One supervisor step for a live job: its start, a poll, its state."""
        if not self._started(job_id, entry):
            return
        p = self._poll(job_id, entry)
        if p is None:
            return
        self.store.ingest(job_id, p.records, p.events)
        status = dict(p.status or {})
        total = status.get("total_steps")
        step = status.get("step")
        self.store.update_progress(
            job_id,
            step=step if isinstance(step, int) else None,
            total_steps=total if isinstance(total, int) else None,
            status=status,
        )
        row = self.store.get_job(job_id)
        if row is not None:
            self._follow_state(job_id, entry, row, status)

    def _started(self, job_id: str, entry: _Live) -> bool:
        """Whether the job's ``start()`` has returned and it can be polled (a failed start
        fails the job; a cancel that came in while it started is sent now)."""
        if entry.start is None:
            return True
        if not entry.start.done():
            late_s = time.monotonic() - entry.since - self.settings.start_timeout_s
            if late_s > START_BACKSTOP_S:
                killed = self._kill_job(job_id)
                self._fail(
                    job_id,
                    f"could not start within {self.settings.start_timeout_s:g} s "
                    f"(ESGD_START_TIMEOUT_S); killed its {len(killed)} actors",
                )
            return False
        exc = entry.start.exception()
        entry.start = None
        entry.since = time.monotonic()
        if exc is not None:
            self._kill_job(job_id)
            self._fail(job_id, f"could not start: {user_error(exc)}", exc)
            return False
        if entry.cancel_requested_at is not None:
            timeout_s = self.settings.cancel_timeout_s
            self._call_quietly(job_id, "cancel", lambda: entry.runner.cancel(timeout_s))
        return True

    def _poll(self, job_id: str, entry: _Live) -> PollLike | None:
        """The runner's poll, or ``None`` if it failed (the job fails after
        ``max_poll_failures`` failures in a row; a job asked to cancel is cancelled by force
        at the first)."""
        try:
            p = entry.runner.poll()
        except Exception as exc:  # noqa: BLE001 - any Ray error is data: recorded below
            entry.poll_failures += 1
            log.warning("job %s: poll %d failed: %r", job_id, entry.poll_failures, exc)
            if entry.cancel_requested_at is not None:
                # the runner does not bring back a coordinator of a cancelled job (a restart
                # Ray made is left unresumed): nothing would end the job by itself
                self._force_cancel(
                    job_id, f"its coordinator could not be polled after the cancel: {describe(exc)}"
                )
            elif entry.poll_failures >= self.settings.max_poll_failures:
                self._call_quietly(job_id, "finish", entry.runner.finish)
                self._fail(
                    job_id,
                    f"lost contact with coordinator {coordinator_name(job_id)}: "
                    f"{entry.poll_failures} polls in a row failed "
                    f"(ESGD_MAX_POLL_FAILURES={self.settings.max_poll_failures}); "
                    f"last error: {describe(exc)}",
                    exc,
                )
            return None
        entry.poll_failures = 0
        return p

    def _follow_state(
        self, job_id: str, entry: _Live, row: JobRow, status: Mapping[str, Any]
    ) -> None:
        """Move the job to the state its coordinator reports (or check its timeouts)."""
        current = JobState(row.state)
        target = map_runner_state(status.get("state"))
        if target is not None and target is not JobState.STARTING:
            entry.seen_status = True
        if target is None or target is current or current.terminal:
            self._check_timeouts(job_id, entry)
            return
        if target is JobState.SUCCEEDED and current is JobState.STARTING:
            # a short job can finish between two polls; it did run: keep the lifecycle whole
            self._transition(job_id, current, JobState.RUNNING, "coordinator ran", step=row.step)
            current = JobState.RUNNING
        if target.terminal:
            self._finish(job_id, entry, current, target, status)
        elif target is not JobState.STARTING:
            try:
                self._transition(
                    job_id, current, target, f"coordinator reports {target}", step=row.step
                )
            except (InvalidTransition, StaleState) as exc:
                log.warning("job %s: ignored runner state %s: %s", job_id, target, exc)

    def _finish(
        self,
        job_id: str,
        entry: _Live,
        current: JobState,
        target: JobState,
        status: Mapping[str, Any],
    ) -> None:
        """The coordinator ended: collect the outputs, then record the terminal state."""
        summary: dict[str, Any] | None = None
        error = status.get("error") or None
        failure: BaseException | None = None
        try:  # the coordinator may have produced records after the poll that saw it end
            last = entry.runner.poll()
            self.store.ingest(job_id, last.records, last.events)
        except Exception as exc:  # noqa: BLE001 - any Ray error is data: recorded below
            log.debug("job %s: final poll failed: %r", job_id, exc)
        try:
            summary = entry.runner.finish()
        except Exception as exc:
            log.exception("job %s: finish failed", job_id)
            failure = exc
            if target is JobState.SUCCEEDED:
                target, error = (
                    JobState.FAILED,
                    f"writing the job's outputs failed: {describe(exc)}",
                )
            elif target is JobState.FAILED and error is None:
                error = str(user_error(exc))
        if summary is not None:
            self.store.set_summary(job_id, summary)
        reason = {
            JobState.SUCCEEDED: "all steps done",
            JobState.CANCELLED: "cancelled on request",
            JobState.FAILED: f"training failed: {error or NO_REASON}",
        }[target]
        try:
            self._transition(
                job_id,
                current,
                target,
                reason,
                error=None if target is not JobState.FAILED else error and str(error),
                detail=None if failure is None else _with_traceback(reason, failure),
                step=int(status.get("step") or 0),
            )
        except (StaleState, InvalidTransition) as exc:
            log.warning("job %s: could not record end state %s: %s", job_id, target, exc)

    def _check_timeouts(self, job_id: str, entry: _Live) -> None:
        now = time.monotonic()
        if not entry.seen_status and now - entry.since > self.settings.start_timeout_s:
            timeout_s = self.settings.cancel_timeout_s
            self._call_quietly(job_id, "cancel", lambda: entry.runner.cancel(timeout_s))
            self._kill_job(job_id)
            self._fail(
                job_id,
                f"the coordinator did not report running within {self.settings.start_timeout_s:g}"
                " s (ESGD_START_TIMEOUT_S); the cluster may lack the resources it asked for",
            )
        elif (
            entry.cancel_requested_at is not None
            and now - entry.cancel_requested_at > CANCEL_GRACE_S
        ):
            self._force_cancel(
                job_id, f"the coordinator had not stopped {CANCEL_GRACE_S:g} s after the cancel"
            )

    def _call_quietly(self, job_id: str, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - any Ray error is data: recorded below
            log.warning("job %s: %s failed: %r", job_id, what, exc)

    def _pending_jobs(
        self, ids: Sequence[str]
    ) -> list[tuple[str, JobSpec, list[dict[str, float]]]]:
        """``(id, spec, bundles)`` of the given pending jobs, each worked out once and cached."""
        with self._lock:
            for gone in set(self._pending) - set(ids):
                del self._pending[gone]
            known = dict(self._pending)
        out = []
        for job_id in ids:
            spec, bundles = known.get(job_id, (None, None))
            try:
                if spec is None:
                    spec = self.spec_of(job_id)
                if bundles is None:
                    # what each actor asks Ray for: its CPUs (and GPUs) and its memory
                    bundles = with_memory(
                        self.backend.resources(spec), self._footprint_of(job_id, spec)
                    )
            except Exception as exc:  # noqa: BLE001 - any Ray error is data: recorded below
                self._fail(job_id, f"cannot work out the resources it needs: {exc}")
                continue
            with self._lock:
                self._pending[job_id] = (spec, bundles)
            out.append((job_id, spec, bundles))
        return out

    def _admit_pending(self) -> None:
        self._last_admit = time.monotonic()
        ids = self.store.ids_in_state(JobState.PENDING.value)
        if not ids:
            if self.cluster is not None:
                self._request_resources({}, [])  # the live jobs' floor (or none)
            return
        with self._lock:
            room = max(0, self.settings.max_running_jobs - len(self._live))
        if room == 0:
            # ESGD_MAX_RUNNING_JOBS are running: nothing can start, whatever the cluster has
            # free (and the autoscaler is not asked for jobs that could not start anyway)
            self._announce_queued(ids)
            return
        jobs = self._within_budgets(self._pending_jobs(ids))
        pending = [(job_id, bundles) for job_id, _, bundles in jobs]
        specs = {job_id: spec for job_id, spec, _ in jobs}
        if self.cluster is None:
            admitted, waiting = [j for j, _ in pending], cast(list[str], [])
        else:
            try:
                available = self.cluster.available()
                nodes = self.cluster.node_capacities()
            except Exception as exc:  # noqa: BLE001 - any Ray error is data: recorded below
                log.warning("cannot read the cluster's resources: %r", exc)
                return
            with self._lock:
                starting = [e.spec for e in self._live.values() if e.start is not None]
            reserved = total_of([b for s in starting for b in self.backend.resources(s)])
            free = {k: v - reserved.get(k, 0.0) for k, v in available.items()}
            admitted, waiting = admit(pending, free, nodes)
            for job_id in waiting:
                need = total_of(dict(pending)[job_id])
                self._announce_wait(
                    job_id,
                    "resources",
                    f"waiting for resources: needs {describe_resources(need)}, cluster "
                    f"has {describe_resources(free)} free; asked the autoscaler",
                )
        if len(admitted) > room:
            self._announce_queued(admitted[room:])
            admitted = admitted[:room]
        for job_id in admitted:
            self._start(job_id, specs[job_id])
        if self.cluster is not None:
            self._request_resources(dict(pending), waiting)

    def _within_budgets(
        self, jobs: Sequence[tuple[str, JobSpec, list[dict[str, float]]]]
    ) -> list[tuple[str, JobSpec, list[dict[str, float]]]]:
        """The pending jobs the service's budgets let start now, oldest first: one that
        would take the live jobs past a service budget waits (with the reason), one over a
        budget on its own (the budgets changed since it was accepted) fails."""
        budgets = self.settings.budgets
        in_use = self._in_use()
        out = []
        for job_id, spec, bundles in jobs:
            fp = self._footprint_of(job_id, spec)
            d = decide(spec, fp, budgets, in_use)
            if d.verdict is Verdict.REFUSE:
                self._fail(job_id, "; ".join(f"{f}: {m}" for f, m in d.problems))
            elif d.verdict is Verdict.PEND:
                self._announce_wait(job_id, "queued", d.reason)
            else:
                in_use = in_use.plus(fp)
                out.append((job_id, spec, bundles))
        return out

    def _announce_wait(self, job_id: str, kind: str, reason: str) -> None:
        """Tell a pending job (once) why it waits: an event, and its status (GET /jobs/{id}
        shows it as ``waiting``)."""
        if job_id in self._announced_wait:
            return
        self._announced_wait.add(job_id)
        self.store.add_event(job_id, kind, reason)
        self.store.update_progress(job_id, status={"waiting": reason})

    # -- the reaper ------------------------------------------------------------------------

    def reap(self) -> dict[str, list[str]]:
        """Kill every actor of the service's namespace that belongs to a job of this service
        that is no longer live, with a ``reap`` event on the job and a log line (a job the
        store does not know is another service's on the same cluster: left alone).

        Returns:
            The actors killed, by job.
        """
        names = self.backend.actors()  # first: a job is live before it creates actors
        live = {j for st in JobState if st.live for j in self.store.ids_in_state(st.value)}
        with self._lock:
            live |= set(self._live)
        candidates = {j for n in names if (j := job_of_actor(n)) is not None} - live
        known = {j for j in candidates if self.store.get_job(j) is not None}
        reaped: dict[str, list[str]] = {}
        for job_id, group in orphans(names, live, known).items():
            killed = self.backend.kill(group)
            if not killed:
                continue
            reaped[job_id] = killed
            detail = (
                f"killed {len(killed)} actors left behind by the job: {', '.join(killed[:8])}"
                + (f" and {len(killed) - 8} more" if len(killed) > 8 else "")
            )
            log.warning("reaper: job %s: %s", job_id, detail)
            self.store.add_event(job_id, EventKind.REAP.value, detail)
        return reaped

    def _reap_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_reap < self.settings.reap_interval_s:
            return
        self._last_reap = now
        try:
            self.reap()
        except Exception as exc:  # noqa: BLE001 - any Ray error is data: retried next time
            log.warning("reaper: sweep failed: %r", exc)

    def _announce_queued(self, ids: Sequence[str]) -> None:
        """Tell each job (once) that it waits for a running slot, not for resources."""
        new = [j for j in ids if j not in self._announced_wait]
        detail = (
            f"waiting: {self.settings.max_running_jobs} jobs may run at once "
            "(ESGD_MAX_RUNNING_JOBS)"
        )
        self.store.add_events([(job_id, "queued", detail) for job_id in new])
        self._announced_wait.update(new)

    def _request_resources(
        self, pending: Mapping[str, Sequence[Bundle]], waiting: Sequence[str]
    ) -> None:
        """Ask the autoscaler for every live and waiting job's bundles (a total, not a delta:
        ``request_resources`` replaces the previous request; withdrawn once no job is live
        or waiting).

        A live job's bundles stay in the request until it ends: the nodes launched for a
        job are kept between its admission and its actors' placement (an autoscaler
        removes a node that is idle for ``idle_timeout_minutes``, and a coordinator that
        starts slowly leaves them idle), and a worker lost with its node gets a new one.
        """
        assert self.cluster is not None
        with self._lock:
            live_specs = [e.spec for e in self._live.values()]
        wanted: list[Bundle] = [b for s in live_specs for b in self.backend.resources(s)]
        wanted += [b for j in waiting for b in pending[j]]
        # without Ray's memory resource: node types seldom declare it (it is detected on
        # the node), and the autoscaler leaves a bundle no node type declares unserved
        bundles = [{k: v for k, v in b.items() if k != "memory"} for b in wanted]
        if bundles != self._requested:
            try:
                self.cluster.request(bundles)
                self._requested = bundles
                log.info("asked the autoscaler for %d bundles", len(bundles))
            except Exception as exc:  # noqa: BLE001 - any Ray error is data: recorded below
                log.warning("request_resources failed: %r", exc)

    def _start(self, job_id: str, spec: JobSpec) -> None:
        try:
            self._transition(
                job_id,
                JobState.PENDING,
                JobState.STARTING,
                "resources available; starting coordinator and workers",
            )
        except (StaleState, InvalidTransition):
            return  # cancelled meanwhile
        self._announced_wait.discard(job_id)
        self._launch(job_id, spec, self.settings.runs_dir / job_id)

    def _launch(self, job_id: str, spec: JobSpec, out_dir: Path) -> None:
        """Create a starting job's runner and start it in the background."""
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            runner = self.backend.create(job_id, spec, out_dir, self.settings.data_dir)
        except Exception as exc:  # noqa: BLE001 - any Ray error is data: recorded below
            self._fail(job_id, f"could not create its runner: {user_error(exc)}", exc)
            return
        self._supervise(job_id, runner, spec)

    def _supervise(self, job_id: str, runner: RunnerLike, spec: JobSpec) -> None:
        entry = _Live(runner=runner, spec=spec)
        with self._lock:
            self._live[job_id] = entry
        entry.start = self._pool.submit(runner.start)


def _unusable_path(exc: BaseException) -> str:
    """Why the filesystem refused a ``dataset.path``, and what to change."""
    if isinstance(exc, ValueError):
        why = "it holds a NUL byte"
    elif isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        why = "it runs into a symlink loop"  # RuntimeError up to Python 3.12, ELOOP after
    else:
        why = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
    return (
        f"cannot be resolved in the data directory ({why}); give the name of a regular "
        ".npz file inside the data directory (ESGD_DATA_DIR)"
    )


def _with_traceback(reason: str, exc: BaseException) -> str:
    """``reason`` followed by ``exc``'s full traceback (a Ray error's remote one included)."""
    return f"{reason}\n\n{''.join(traceback.format_exception(exc))}"


def _unknown(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job {job_id!r}: list the known jobs with GET /jobs")


def parse_fault(data: Any) -> FaultSpec:
    """Validate a fault given over HTTP or the CLI.

    Raises:
        SpecError: with one ``(field path, message)`` per problem.
    """
    if not isinstance(data, dict):
        raise SpecError([("fault", f"must be a mapping of fields, got {type(data).__name__}")])
    try:
        return FaultSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_errors(exc)) from None
