"""The driver side of one training job: start it on Ray, poll it, steer it, collect it.

:class:`JobRunner` is what both the CLI (``elastic-sgd run``) and the service's job manager
use. It creates the coordinator actor (named ``esgd-<job id>`` in namespace ``elastic-sgd``,
detached when the service runs it, so an API restart can re-attach), forwards control calls,
and hands back metrics and events exactly once per poller (the coordinator keeps them until a
later poll acknowledges them). It connects to Ray on first use as :mod:`service.ray_conn`
says (an embedded instance unless ``ESGD_RAY_ADDRESS``/``RAY_ADDRESS`` names a cluster), and
errors raised by the coordinator reach the caller as :mod:`service.ray_errors` words them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.checkpoint import latest_valid
from actors.coordinator import Coordinator
from actors.coordinator.recovery import replay_journal
from actors.messages import Launch
from core.errors import TrainingFailed
from core.events import Event, Record
from core.names import NAMESPACE, coordinator_name, job_of_actor
from core.spec import FaultSpec, JobSpec
from service.budget import Footprint, estimate, placement, total, with_memory
from service.ray_conn import ensure_connected
from service.ray_errors import user_error
from service.tensorboard import TENSORBOARD_DIR, TensorBoardLog

log = logging.getLogger(__name__)

# what a call to a coordinator whose process died raises (while Ray restarts it)
_ACTOR_DOWN = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# A worker must be placed and answer within this share of the start timeout, so that the
# coordinator's "worker failed to start" (with its reason) comes before the driver gives up:
# the other half covers the coordinator's own start (a process, torch, the dataset: ~5 s on
# a loaded 2-core machine) with room to spare.
WORKER_START_SHARE = 0.5
# How often a start waiting for room looks at the cluster again.
PLACEMENT_POLL_S = 0.5
# The coordinator's process environment. Its updates in sync and local mode run on the
# cores of the workers waiting for them (Training.apply_threads); torch's OpenMP threads
# otherwise spin for a while after each parallel region, on cores the workers are by then
# computing on (sync, 1.6M MLP, 2 workers: their forward+backward went from 17.5 to 18-19
# ms). PASSIVE makes idle threads sleep.
COORDINATOR_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def service_actors() -> list[str]:
    """Names of every named actor in the service's namespace (detached ones included)."""
    return [
        str(a["name"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE
    ]


def kill_actors(names: list[str]) -> list[str]:
    """Kill these actors of the service's namespace (no restart); returns those killed."""
    killed = []
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except (ValueError, ray.exceptions.RayError) as exc:
            log.debug("could not kill actor %s: %r", name, exc)
            continue
        killed.append(name)
    return killed


def kill_job_actors(job_id: str) -> list[str]:
    """Kill the coordinator and every worker of ``job_id`` by name, whatever state they
    are in (restarting, detached, never placed); returns the names killed."""
    return kill_actors([n for n in service_actors() if job_of_actor(n) == job_id])


@dataclass
class Poll:
    """What one poll brought: new records and events, and the job's status now."""

    records: list[Record] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)


class JobRunner:
    """Driver-side handle on one training job running on Ray.

    Args:
        job_id: unique id (names the coordinator actor).
        spec: the validated job.
        out_dir: where ``metrics.jsonl``, ``model.pt`` and ``summary.json`` go (and, when
            the spec asks for ``tensorboard``, the event files in ``tensorboard/``).
        data_dir: where ``npz`` datasets are looked up.
        detached: keep the coordinator alive if this process dies (the service does).
        state_dir: checkpoints and journal (default ``out_dir / "state"``).
        start_timeout_s: every phase of starting (the coordinator's construction and its
            restarts, its workers' placement) must end within this many seconds.
        placement_timeout_s: before creating any actor, wait at most this long for the
            cluster to have room for the whole job, then fail saying what it lacks
            (``None``: no wait, as in the service, whose admission already checked).
        on_wait: told once, within seconds, what the job needs and what the cluster has,
            when it has to wait for room.
        runtime_env: Ray's runtime_env for the job's actors, set where this process
            connects to Ray (:func:`service.ray_conn.connect`: Ray takes local directories
            only for a whole driver), so the coordinator and its workers (which inherit
            it) import the task's package from it.
    """

    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        out_dir: Path,
        *,
        data_dir: Path | None = None,
        detached: bool = True,
        state_dir: Path | None = None,
        start_timeout_s: float = 120.0,
        placement_timeout_s: float | None = None,
        on_wait: Callable[[str], None] | None = None,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        self.job_id = job_id
        self.runtime_env = runtime_env
        self.start_timeout_s = start_timeout_s
        self.placement_timeout_s = placement_timeout_s
        self.on_wait = on_wait
        # set by cancel(): a start or a recovery under way gives up
        self.cancelled = False
        self.spec = spec
        self.out_dir = Path(out_dir)
        self.data_dir = data_dir
        self.detached = detached
        # checkpoints and the coordinator's journal live here (they outlive a crash)
        self.state_dir = Path(state_dir) if state_dir is not None else self.out_dir / "state"
        self.restarts = 0
        # start() continues from the latest checkpoint in state_dir instead of from step 0
        self.resume = False
        self.actor: Any = None
        self.run_ref: Any = None
        self._seen = 0  # highest seq handed to the caller
        self._acked = 0  # highest seq the coordinator may forget
        # the spec's ``tensorboard``: the records also go to event files in the job's folder
        self.tensorboard = (
            TensorBoardLog(self.out_dir / TENSORBOARD_DIR) if spec.tensorboard else None
        )

    @property
    def actor_name(self) -> str:
        return coordinator_name(self.job_id)

    @staticmethod
    def resources(spec: JobSpec) -> list[dict[str, float]]:
        """Resource bundles the job needs: the coordinator's, then one per worker."""
        r = spec.resources
        worker: dict[str, float] = {"CPU": r.worker_cpus}
        if not isinstance(r.worker_gpus, str) and r.worker_gpus > 0:
            worker["GPU"] = r.worker_gpus
        return [{"CPU": r.coordinator_cpus}] + [dict(worker) for _ in range(spec.workers)]

    def start(self) -> dict[str, Any]:
        """Create the coordinator and its workers, then start training (returns at once).

        Raises:
            ElasticSGDError: the spec cannot run here (e.g. an ``npz`` path problem).
        """
        ensure_connected(self.runtime_env)
        fp = estimate(self.spec, self.data_dir)
        if self.placement_timeout_s is not None:
            self.wait_for_placement(fp, self.placement_timeout_s)
        if self.cancelled:
            raise TrainingFailed(f"job {self.job_id} was cancelled before it started")
        if not self.resume:
            # a fresh start: checkpoints and journal of an earlier run here are not ours
            shutil.rmtree(self.state_dir, ignore_errors=True)
        opts: dict[str, Any] = {
            "name": self.actor_name,
            "namespace": NAMESPACE,
            "num_cpus": self.spec.resources.coordinator_cpus,
            # Ray's scheduler places the coordinator only where its estimate is unreserved
            "memory": fp.coordinator_bytes,
            # Ray restarts a crashed coordinator; it resumes from its last checkpoint
            "max_restarts": self.spec.max_coordinator_restarts,
            # COORDINATOR_ENV (merged with the job's runtime_env by Ray)
            "runtime_env": {"env_vars": COORDINATOR_ENV},
        }
        if self.detached:
            opts["lifetime"] = "detached"
        launch = Launch(
            worker_memory_bytes=fp.worker_bytes,
            worker_start_timeout_s=WORKER_START_SHARE * self.start_timeout_s,
        )
        self.actor = Coordinator.options(**opts).remote(  # type: ignore[attr-defined]
            self.job_id,
            self.spec,
            None if self.data_dir is None else str(self.data_dir),
            str(self.state_dir),
            self.resume,
            launch,
        )
        info = self._start_remote()
        self.run_ref = self.actor.run.remote()
        return info

    def wait_for_placement(self, fp: Footprint, timeout_s: float) -> None:
        """Wait until the cluster has room for the whole job (told to :attr:`on_wait` once,
        at once, if it has not).

        Raises:
            TrainingFailed: no room within ``timeout_s``: what the job needs, what the
                cluster has.
        """
        need = total(with_memory(self.resources(self.spec), fp))
        deadline = time.monotonic() + timeout_s
        told = False
        while True:
            p = placement(need, ray.cluster_resources(), ray.available_resources())
            if p.now:
                return
            if not told and self.on_wait is not None:
                self.on_wait(f"{p.message}; waiting up to {timeout_s:g} s")
                told = True
            if self.cancelled or time.monotonic() >= deadline:
                raise TrainingFailed(
                    f"cannot place job {self.job_id}: {p.message} (waited {timeout_s:g} s)"
                )
            time.sleep(PLACEMENT_POLL_S)

    def _start_remote(self) -> dict[str, Any]:
        """The coordinator's ``start()`` (its workers up); a failure says why, in a line.

        The wait is bounded by ``start_timeout_s``, Ray's restarts of a coordinator that
        died while it was being built included; past it the job's actors are killed.

        Raises:
            ElasticSGDError: the coordinator's own error, or a TrainingFailed naming the
                cause (its constructor or ``start()`` raised, the actor died, or it did not
                start in time).
        """
        try:
            info: dict[str, Any] = ray.get(self.actor.start.remote(), timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            killed = kill_job_actors(self.job_id)
            raise TrainingFailed(
                f"the coordinator did not start within {self.start_timeout_s:g} s "
                f"(ESGD_START_TIMEOUT_S; it may be restarting after running out of memory); "
                f"killed its {len(killed)} actors"
            ) from exc
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
            raise user_error(
                exc, "the coordinator could not start", advice="see the Ray logs"
            ) from exc
        return info

    def _recover(self) -> None:
        """The coordinator's process died: Ray restarts it; resume it and run again (within
        ``start_timeout_s``; a cancel stops the wait)."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                ray.get(self.actor.ping.remote(), timeout=5)
                break
            except (*_ACTOR_DOWN, ray.exceptions.GetTimeoutError) as exc:
                if self.cancelled:
                    raise TrainingFailed(
                        "the job was cancelled while Ray restarted its coordinator (not "
                        f"resumed): {exc}"
                    ) from exc
                if time.monotonic() > deadline:
                    raise TrainingFailed(
                        f"the coordinator did not come back within {self.start_timeout_s:g} s: "
                        f"{exc}; see the Ray logs"
                    ) from exc
                time.sleep(0.1)
        self.restarts += 1
        self._start_remote()
        self.run_ref = self.actor.run.remote()

    def _call(self, method: str, *args: Any) -> Any:
        """Call a coordinator method.

        Raises:
            ElasticSGDError: the method raised (our own error as it is, another one as a
                TrainingFailed naming it).
            ray.exceptions.RayActorError: the coordinator did not answer.
        """
        try:
            return ray.get(getattr(self.actor, method).remote(*args))
        except ray.exceptions.RayTaskError as exc:
            raise user_error(exc, f"the coordinator's {method} failed") from exc

    @classmethod
    def attach(
        cls, job_id: str, spec: JobSpec, out_dir: Path, *, data_dir: Path | None = None
    ) -> JobRunner | None:
        """Re-attach to a detached coordinator that still runs; ``None`` if it is gone."""
        ensure_connected()
        runner = cls(job_id, spec, out_dir, data_dir=data_dir, detached=True)
        try:
            runner.actor = ray.get_actor(runner.actor_name, namespace=NAMESPACE)
            ray.get(runner.actor.ping.remote(), timeout=10)
        except (ValueError, ray.exceptions.RayError):
            return None
        return runner

    @classmethod
    def resumable(
        cls,
        job_id: str,
        spec: JobSpec,
        out_dir: Path,
        *,
        data_dir: Path | None = None,
        runtime_env: dict[str, Any] | None = None,
    ) -> tuple[JobRunner, int, int] | None:
        """A runner whose :meth:`start` continues the job from its latest valid checkpoint
        (its coordinator is gone, e.g. with the Ray instance of a killed service), that
        checkpoint's step, and the steps trained after it that the resume trains again (read
        from the coordinator's journal, as the resumed coordinator counts them); ``None`` if
        the job left no valid checkpoint."""
        runner = cls(
            job_id, spec, out_dir, data_dir=data_dir, detached=True, runtime_env=runtime_env
        )
        loaded = latest_valid(runner.state_dir / "checkpoints")
        if loaded is None:
            return None
        runner.resume = True
        return runner, loaded.step, replay_journal(runner.state_dir).steps_redone(loaded.step)

    def poll(self) -> Poll:
        """New records/events since the last poll, plus the status.

        If the coordinator's process died, waits for Ray to restart it and resumes it from
        its last checkpoint (at most ``max_coordinator_restarts`` times).
        """
        try:
            out = ray.get(self.actor.poll_async.remote(self._acked))
        except _ACTOR_DOWN:
            if self.restarts >= self.spec.max_coordinator_restarts:
                raise
            self._recover()
            out = ray.get(self.actor.poll_async.remote(self._acked))
        self._acked = self._seen
        recs: list[Record] = [r for r in out["records"] if r.seq > self._seen]
        evs: list[Event] = [e for e in out["events"] if e.seq > self._seen]
        self._seen = max([self._seen] + [x.seq for x in [*recs, *evs]])
        self._append_metrics(recs)
        return Poll(recs, evs, out["status"])

    def _append_metrics(self, recs: list[Record]) -> None:
        if not recs:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            for r in recs:
                f.write(json.dumps(r.to_dict()) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(recs)

    def done(self) -> bool:
        """True once the job reached a terminal state (a crashed coordinator is not done)."""
        if self.run_ref is None:
            try:
                state = ray.get(self.actor.ping.remote())
            except _ACTOR_DOWN:
                return False
            return state in ("succeeded", "failed", "cancelled")
        ready, _ = ray.wait([self.run_ref], timeout=0)
        if not ready:
            return False
        try:
            ray.get(self.run_ref)
        except _ACTOR_DOWN:
            if self.restarts >= self.spec.max_coordinator_restarts:
                return True
            self._recover()
            return False
        except ray.exceptions.RayTaskError as exc:
            raise user_error(exc, "the coordinator's training loop failed") from exc
        return True

    def scale(self, n: int) -> None:
        """Resize the running job to ``n`` workers (errors name the limit to change)."""
        self._call("scale", n)

    def inject(self, fault: FaultSpec) -> None:
        """Inject ``fault`` into the running job now (a live injection)."""
        self._call("inject_async", fault)

    def cancel(self, timeout_s: float | None = None) -> None:
        """Ask the coordinator to stop the job (it ends as cancelled).

        Raises:
            ray.exceptions.GetTimeoutError: no answer within ``timeout_s`` (the caller kills
                the job's actors by name: :func:`kill_job_actors`).
        """
        self.cancelled = True
        if self.actor is None:
            return
        try:
            ray.get(self.actor.cancel_async.remote(), timeout=timeout_s)
        except ray.exceptions.RayTaskError as exc:
            raise user_error(exc, "the coordinator's cancel failed") from exc

    def model_bytes(self) -> bytes:
        """The current model's ``state_dict``, as ``torch.save`` wrote it."""
        data: bytes = self._call("model_bytes_async")
        return data

    def finish(self) -> dict[str, Any]:
        """Wait for the end, write the run's files, release the actors; returns the summary.

        Raises:
            ElasticSGDError: the training loop raised, or the coordinator is gone for good.
        """
        if self.run_ref is not None:
            try:
                summary: dict[str, Any] = ray.get(self.run_ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                raise user_error(exc, "the coordinator's training loop failed") from exc
        else:
            summary = self._call("summary_async")
        self.poll()  # the last records
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "model.pt").write_bytes(self.model_bytes())
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self.release()
        return summary

    def release(self) -> None:
        """Stop the workers and the coordinator (and close the job's event files)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.actor is None:
            return
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(self.actor.shutdown.remote(), timeout=30)
        with contextlib.suppress(ray.exceptions.RayError):
            ray.kill(self.actor, no_restart=True)
        self.actor = None
        # workers are detached (they outlive a coordinator crash): make sure none is left
        with contextlib.suppress(ray.exceptions.RayError):
            kill_job_actors(self.job_id)
