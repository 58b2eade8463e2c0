"""A scriptable stand-in for ``service.runner.JobRunner`` — for unit tests of pure logic only.

It follows the runner contract (poll returns records/events new since the last poll, each
with a monotonically increasing ``seq``; status carries the state) and can be told to fail:
at start, on every poll, or by ending in ``failed``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ElasticSGDError
from core.events import Event, Record, record_from_dict
from core.spec import FaultSpec, JobSpec
from service.ray_conn import GcsProbe


@dataclass
class FakePoll:
    records: list[Record] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)


@dataclass
class Script:
    """How a fake job behaves."""

    steps_per_poll: int = 2
    end: str = "succeeded"  # terminal state reached after the last step
    error: str | None = None  # status error when end == "failed"
    start_error: Exception | None = None
    poll_error: Exception | None = None  # raised by every poll while set
    resend_last: bool = False  # re-deliver the previous batch too (as after a crash)
    cancel_error: Exception | None = None  # raised by cancel (a coordinator not answering)


class FakeRunner:
    def __init__(self, job_id: str, spec: JobSpec, out_dir: Path, script: Script) -> None:
        self.job_id = job_id
        self.spec = spec
        self.out_dir = out_dir
        self.script = script
        self.total = spec.steps or 10
        self.state = "starting"
        self.step = 0
        self.workers = spec.workers
        self.seq = 0
        self.calls: list[Any] = []
        self._cancel = False
        self._queue: list[dict[str, Any]] = []
        self._queued_events: list[Event] = []
        self._last: FakePoll | None = None
        self.lock = threading.Lock()

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def start(self) -> dict[str, Any]:
        self.calls.append("start")
        if self.script.start_error is not None:
            raise self.script.start_error
        self.state = "running"
        return {"workers": self.workers}

    def poll(self) -> FakePoll:
        with self.lock:
            self.calls.append("poll")
            if self.script.poll_error is not None:
                raise self.script.poll_error
            recs: list[Record] = []
            evs = list(self._queued_events)
            self._queued_events.clear()
            if self._cancel and self.state in ("running", "recovering"):
                self.state = "cancelled"
            elif self.state == "running":
                for _ in range(self.script.steps_per_poll):
                    if self.step >= self.total:
                        break
                    self.step += 1
                    recs.append(
                        record_from_dict(
                            {
                                "seq": self._next(),
                                "kind": "step",
                                "step": self.step,
                                "time_s": 0.1 * self.step,
                                "wall_time": 1e9 + self.step,
                                "loss": 2.0 / self.step,
                                "samples_per_s": 100.0,
                                "b_hat": 0.0,
                                "b_hat_max": 0.0,
                                "bound": 0.0,
                                "workers": self.workers,
                                "samples": 0,
                            }
                        )
                    )
                    if self.step % 2 == 0:
                        recs.append(
                            record_from_dict(
                                {
                                    "seq": self._next(),
                                    "kind": "eval",
                                    "step": self.step,
                                    "test_accuracy": 0.5 + 0.01 * self.step,
                                    "test_loss": 1.0,
                                    "time_s": 0.1,
                                    "wall_time": 1e9,
                                    "workers": self.workers,
                                }
                            )
                        )
                if self.step >= self.total:
                    self.state = self.script.end
            poll = FakePoll(recs, evs, self.status())
            out = poll
            if self.script.resend_last and self._last is not None:
                out = FakePoll(self._last.records + recs, self._last.events + evs, poll.status)
            self._last = poll
            return out

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "step": self.step,
            "total_steps": self.total,
            "workers": [
                {"id": i, "state": "running", "node": "n0", "step": self.step}
                for i in range(self.workers)
            ],
            "b_hat_max": 0.0,
            "b_hat_mean": 0.0,
            "bound": 0.0,
            "error": self.script.error if self.state == "failed" else None,
        }

    def scale(self, n: int) -> None:
        self.calls.append(("scale", n))
        self.workers = n
        self._queued_events.append(
            Event.from_dict(
                {
                    "seq": self._next(),
                    "kind": "membership",
                    "target": None,
                    "detail": f"scaled to {n}",
                    "step": self.step,
                    "wall_time": 1e9,
                    "time_s": 0.0,
                }
            )
        )

    def inject(self, fault: FaultSpec) -> None:
        self.calls.append(("inject", fault.kind))
        self._queued_events.append(
            Event.from_dict(
                {
                    "seq": self._next(),
                    "kind": "inject",
                    "target": "worker-0",
                    "detail": fault.kind,
                    "fault": fault.kind,
                    "step": self.step,
                    "wall_time": 1e9,
                    "time_s": 0.0,
                }
            )
        )

    def cancel(self, timeout_s: float | None = None) -> None:  # noqa: ARG002 - answers at once
        self.calls.append("cancel")
        if self.script.cancel_error is not None:
            raise self.script.cancel_error
        self._cancel = True

    def finish(self) -> dict[str, Any]:
        self.calls.append("finish")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "model.pt").write_bytes(b"fake-model-" + self.job_id.encode())
        return {
            "final_test_accuracy": 0.97,
            "steps": self.step,
            "state": self.state,
            "consistency": {"b_hat_max": 0.0, "b_hat_mean": 0.0, "bound": 0.0},
        }

    def model_bytes(self) -> bytes:
        return b"live-model"


class FakeBackend:
    """Makes :class:`FakeRunner`s; ``survivors`` are what :meth:`attach` finds after a restart,
    ``checkpoints`` the step of the checkpoint :meth:`resumable` finds for a job."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.runners: dict[str, FakeRunner] = {}
        self.survivors: dict[str, FakeRunner] = {}
        self.checkpoints: dict[str, int] = {}
        # steps a resume trains again (as the coordinator's journal says), per job
        self.redone: dict[str, int] = {}
        # named actors in the service's namespace (the reaper's view) and those killed
        self.named: list[str] = []
        self.killed: list[str] = []
        # Ray's GCS as the probe sees it, and the reconnections made
        self.gcs_up = True
        self.gcs_silent = False  # a down GCS times out (busy, or its host gone) vs refuses
        self.reconnects = 0

    # the RunnerBackend protocol's signatures: a fake needs no data directory
    def create(
        self,
        job_id: str,
        spec: JobSpec,
        out_dir: Path,
        data_dir: Path,  # noqa: ARG002
    ) -> FakeRunner:
        r = FakeRunner(job_id, spec, out_dir, self.script)
        self.runners[job_id] = r
        return r

    def attach(
        self,
        job_id: str,
        spec: JobSpec,  # noqa: ARG002
        out_dir: Path,  # noqa: ARG002
        data_dir: Path,  # noqa: ARG002
    ) -> FakeRunner | None:
        return self.survivors.get(job_id)

    def resumable(
        self,
        job_id: str,
        spec: JobSpec,
        out_dir: Path,
        data_dir: Path,  # noqa: ARG002
    ) -> tuple[FakeRunner, int, int] | None:
        if job_id not in self.checkpoints:
            return None
        r = FakeRunner(job_id, spec, out_dir, self.script)
        r.step = self.checkpoints[job_id]
        self.runners[job_id] = r
        return r, r.step, self.redone.get(job_id, 0)

    def resources(self, spec: JobSpec) -> list[dict[str, float]]:
        r = spec.resources
        return [{"CPU": r.coordinator_cpus}] + [{"CPU": r.worker_cpus}] * spec.workers

    def actors(self) -> list[str]:
        return list(self.named)

    def kill(self, names: list[str]) -> list[str]:
        gone = [n for n in names if n in self.named]
        self.named = [n for n in self.named if n not in gone]
        self.killed += gone
        return gone

    def ray_alive(self) -> GcsProbe:
        if self.gcs_up:
            return GcsProbe.UP
        return GcsProbe.NO_ANSWER if self.gcs_silent else GcsProbe.REFUSED

    def reconnect_ray(self) -> str:
        """A new instance: the old one's coordinators are gone (none survives to attach)."""
        self.reconnects += 1
        self.gcs_up = True
        self.survivors.clear()
        return "127.0.0.1:6380"


class FakeCluster:
    """Free CPUs = ``cpus`` minus what the backend's unfinished fake jobs hold."""

    def __init__(
        self, cpus: float = 2.0, node_cpus: float = 2.0, backend: FakeBackend | None = None
    ) -> None:
        self.cpus = cpus
        self.node_cpus = node_cpus
        self.backend = backend
        # 64 GiB: memory is not what these fakes run short of (budget tests set their own)
        self.memory_bytes = float(64 << 30)
        self.requests: list[list[dict[str, float]]] = []

    def available(self) -> dict[str, float]:
        used = 0.0
        if self.backend is not None:
            for r in self.backend.runners.values():
                if r.state in ("starting", "running", "recovering"):
                    used += sum(b["CPU"] for b in self.backend.resources(r.spec))
        return {"CPU": self.cpus - used, "memory": self.memory_bytes}

    def node_capacities(self) -> list[dict[str, float]]:
        return [{"CPU": self.node_cpus, "memory": self.memory_bytes}]

    def request(self, bundles: list[dict[str, float]]) -> None:
        self.requests.append(bundles)


class BoomError(ElasticSGDError):
    """An error the fake raises on purpose."""
