"""Drills over the service: a job with a fault plan, plus pass criteria checked at its end.

A drill file (``configs/drills/*.yaml``) is a :class:`DrillSpec`::

    name: crash-1-of-4
    job: { ...a JobSpec, with its ``faults`` plan... }
    criteria: { finished: true, min_test_accuracy: 0.95, b_hat_within_bound: true }

``POST /drills`` runs the job through the :class:`~service.jobs.JobManager` like any other
job (so it shows up on the dashboard), and when the job ends :func:`evaluate_drill` (pure)
turns its summary and events into a report. The local drill runner
(``elastic-sgd drill FILE --out DIR``, issue 4) may replace the evaluation; the HTTP
schema and the stored report stay.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import ElasticSGDError, SpecError
from core.spec import JobSpec, format_errors
from service.jobs import JobManager, JobState
from service.store import DrillRow, JobRow, Store, new_id

log = logging.getLogger(__name__)


class DrillNotFound(ElasticSGDError):
    """No drill with that id is known to the service."""


class DrillState(StrEnum):
    RUNNING = "running"  # its job has not ended yet
    PASSED = "passed"  # every evaluated criterion held
    FAILED = "failed"  # at least one criterion did not hold
    ERROR = "error"  # the drill could not be run or evaluated (see ``error``)

    @property
    def terminal(self) -> bool:
        return self is not DrillState.RUNNING


class DrillCriteria(BaseModel):
    """What a drill must show. A criterion left at None is not checked."""

    model_config = ConfigDict(extra="forbid")

    # The job ends in ``succeeded`` (not failed or cancelled).
    finished: bool = True
    min_test_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    # The measured B-hat max stays within the analytic bound the runtime reports.
    b_hat_within_bound: bool = False
    # Seconds from a worker's death to the next applied update (needs the runtime's
    # ``recovery_s`` in the summary).
    max_recovery_s: float | None = Field(default=None, gt=0.0, le=86_400.0)
    # Steps redone after a coordinator restart (needs ``steps_lost`` in the summary).
    max_steps_lost: int | None = Field(default=None, ge=0, le=100_000_000)
    # Seconds from an injected worker crash to its detection (``recoveries`` in the summary).
    max_detect_s: float | None = Field(default=None, gt=0.0, le=86_400.0)
    # Every planned fault with a deterministic trigger appears as a ``fault`` event.
    faults_recorded: bool = True


class DrillSpec(BaseModel):
    """A drill: one job (with its fault plan) and the criteria it must meet."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="drill", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    job: JobSpec
    criteria: DrillCriteria = Field(default_factory=DrillCriteria)


def parse_drill(data: Any) -> DrillSpec:
    """Validate a drill mapping (from YAML or HTTP).

    Raises:
        SpecError: one ``(field path, message)`` per problem, paths like ``job.mode.beta``.
    """
    if not isinstance(data, dict):
        raise SpecError([("drill", f"must be a mapping of fields, got {type(data).__name__}")])
    try:
        return DrillSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_errors(exc)) from None


def _check(
    name: str, passed: bool | None, observed: Any, expected: Any, detail: str = ""
) -> dict[str, Any]:
    return {
        "name": name,
        "passed": passed,
        "observed": observed,
        "expected": expected,
        "detail": detail,
    }


def _float(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def evaluate_drill(
    spec: DrillSpec,
    job_state: str,
    summary: Mapping[str, Any] | None,
    event_kinds: Sequence[str],
) -> dict[str, Any]:
    """Check a finished drill's job against its criteria (pure).

    Args:
        spec: the drill.
        job_state: the job's terminal state.
        summary: the job's ``summary.json`` (None if it wrote none).
        event_kinds: the ``kind`` of every event the job recorded.

    Returns:
        ``{"passed": bool, "checks": [...], "not_evaluated": [...]}``; a check whose data
        the runtime did not provide has ``passed: None`` and does not fail the drill.
    """
    c = spec.criteria
    s = dict(summary or {})
    checks: list[dict[str, Any]] = []
    if c.finished:
        checks.append(
            _check("finished", job_state == JobState.SUCCEEDED.value, job_state, "succeeded")
        )
    if c.min_test_accuracy is not None:
        acc = _float(s.get("final_test_accuracy"))
        ok = None if acc is None else acc >= c.min_test_accuracy
        checks.append(
            _check(
                "min_test_accuracy",
                ok,
                acc,
                f">= {c.min_test_accuracy}",
                "" if acc is not None else "no final_test_accuracy in the summary",
            )
        )
    if c.b_hat_within_bound:
        cons = s.get("consistency") or {}
        b_hat = _float(cons.get("b_hat_max")) if isinstance(cons, dict) else None
        bound = _float(cons.get("bound")) if isinstance(cons, dict) else None
        ok = None if b_hat is None or bound is None else b_hat <= bound * (1 + 1e-9)
        checks.append(
            _check(
                "b_hat_within_bound",
                ok,
                b_hat,
                f"<= bound {bound}",
                "" if ok is not None else "no consistency.b_hat_max/bound",
            )
        )
    if c.max_recovery_s is not None:
        rec = s.get("recovery_s")
        worst = max((float(x) for x in rec), default=0.0) if isinstance(rec, list) else _float(rec)
        checks.append(
            _check(
                "max_recovery_s",
                None if worst is None else worst <= c.max_recovery_s,
                worst,
                f"<= {c.max_recovery_s}",
                "" if worst is not None else "the summary has no recovery_s",
            )
        )
    if c.max_steps_lost is not None:
        lost = s.get("steps_lost")
        lost_i = int(lost) if isinstance(lost, int) and not isinstance(lost, bool) else None
        ok = None if lost_i is None else lost_i <= c.max_steps_lost
        checks.append(
            _check(
                "max_steps_lost",
                ok,
                lost_i,
                f"<= {c.max_steps_lost}",
                "" if lost_i is not None else "the summary has no steps_lost",
            )
        )
    if c.max_detect_s is not None:
        recs = s.get("recoveries")
        det = [
            float(r["detected_after_s"])
            for r in (recs if isinstance(recs, list) else [])
            if isinstance(r, dict) and _float(r.get("detected_after_s")) is not None
        ]
        checks.append(
            _check(
                "max_detect_s",
                max(det) <= c.max_detect_s if det else None,
                max(det) if det else None,
                f"<= {c.max_detect_s}",
                "" if det else "the summary has no recoveries with detected_after_s",
            )
        )
    if c.faults_recorded:
        planned = sum(
            1
            for f in spec.job.faults
            if f.probability is None
            and (f.at_step is not None or f.at_s is not None or f.steps is not None)
        )
        seen = sum(1 for k in event_kinds if k == "fault")
        checks.append(_check("faults_recorded", seen >= planned, seen, f">= {planned}"))
    evaluated = [ch for ch in checks if ch["passed"] is not None]
    return {
        "passed": all(ch["passed"] for ch in evaluated),
        "checks": checks,
        "not_evaluated": [ch["name"] for ch in checks if ch["passed"] is None],
    }


class DrillService:
    """Runs drills as jobs and stores their reports.

    Args:
        jobs: the job manager (the drill's job is an ordinary job with a ``drill_id``).
        store: persistence.
    """

    def __init__(self, jobs: JobManager, store: Store) -> None:
        self.jobs = jobs
        self.store = store
        jobs.on_terminal.append(self._on_job_end)

    def submit(self, spec: DrillSpec) -> DrillRow:
        """Start a drill.

        Raises:
            SpecError: the drill's job cannot be accepted (e.g. its data file is missing).
        """
        self.jobs.check_data_path(spec.job)
        drill_id = new_id()
        self.store.create_drill(
            drill_id, spec.name, spec.model_dump(mode="json"), state=DrillState.RUNNING.value
        )
        job = self.jobs.submit(spec.job, drill_id=drill_id)
        self.store.update_drill(drill_id, job_id=job.id)
        row = self.store.get_drill(drill_id)
        assert row is not None
        return row

    def get(self, drill_id: str) -> DrillRow:
        row = self.store.get_drill(drill_id)
        if row is None:
            raise DrillNotFound(f"no drill {drill_id!r}: start one with POST /drills")
        return row

    def reconcile(self) -> None:
        """Evaluate drills whose job ended while the service was down."""
        for d in self.store.list_drills(states=[DrillState.RUNNING.value]):
            job = None if d.job_id is None else self.store.get_job(d.job_id)
            if job is None:
                self.store.update_drill(
                    d.id,
                    state=DrillState.ERROR.value,
                    error="the service stopped before the drill's job was "
                    "created; start the drill again",
                )
            elif JobState(job.state).terminal:
                self._on_job_end(job)

    def _on_job_end(self, job: JobRow) -> None:
        if job.drill_id is None:
            return
        drill = self.store.get_drill(job.drill_id)
        if drill is None or DrillState(drill.state).terminal:
            return
        try:
            spec = DrillSpec.model_validate(drill.spec)
            kinds = [e.kind for e in self.store.events(job.id, limit=1_000_000)]
            fresh = self.store.get_job(job.id) or job
            report = evaluate_drill(spec, job.state, fresh.summary, kinds)
        except Exception as exc:
            log.exception("drill %s: evaluation failed", drill.id)
            self.store.update_drill(
                drill.id, state=DrillState.ERROR.value, error=f"evaluation failed: {exc!r}"
            )
            return
        report["job_id"] = job.id
        report["job_state"] = job.state
        state = DrillState.PASSED if report["passed"] else DrillState.FAILED
        self.store.update_drill(drill.id, state=state.value, report=report)
        log.info("drill %s (%s): %s", drill.id, drill.name, state)
