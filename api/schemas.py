"""HTTP models, one per direction: ``*Create`` / ``*Request`` come in, ``*Public`` go out.

Incoming bodies reuse the service's own validated models (a job spec is a
:class:`~core.spec.JobSpec`, a fault a :class:`~core.spec.FaultSpec`), so the API
refuses exactly what the CLI refuses, with the same field paths and messages. Outgoing
models never carry NaN or infinity (JSON has neither): those become null.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidatorFunctionWrapHandler, WrapValidator

from core.spec import FaultSpec, JobSpec
from core.state import JobState
from service.drills.spec import DrillSpec
from service.public_errors import NO_REASON
from service.store import DrillRow, EventRow, JobRow

M = TypeVar("M", bound=BaseModel)


def strictly(model: type[M]) -> Callable[[Any, ValidatorFunctionWrapHandler], M]:
    """A wrap validator that validates a request body as its JSON Schema types it: strict
    (no lax coercion: ``0`` is not ``false``, ``"2"`` is not ``2``), nested sections included.
    A YAML spec file keeps pydantic's lax reading; an HTTP body does what its schema says."""

    def validate(value: Any, _handler: ValidatorFunctionWrapHandler) -> M:
        return model.model_validate(value, strict=True)

    return validate


def clean(obj: Any) -> Any:
    """Replace NaN/inf by None, recursively (metrics of a diverging run)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def ts_opt(t: float | None) -> datetime | None:
    return None if t is None else ts(t)


def _f(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


# -- errors -----------------------------------------------------------------------------------


class FieldError(BaseModel):
    path: str = Field(description="dotted path of the refused field, e.g. mode.beta")
    message: str = Field(description="what is wrong and what is allowed")


# At most this many field errors in a body (60,000 unknown keys made a 4.7 MB answer).
MAX_FIELD_ERRORS = 50


class ErrorPublic(BaseModel):
    """Every 4xx/5xx body: ``detail`` says what went wrong and what to change."""

    detail: str
    errors: list[FieldError] = Field(
        default_factory=list,
        max_length=MAX_FIELD_ERRORS,
        description=f"the refused fields, the first {MAX_FIELD_ERRORS}",
    )
    errors_omitted: int = Field(
        default=0, ge=0, description="how many more fields were refused than are listed"
    )


# -- jobs -------------------------------------------------------------------------------------


# A job spec as the API docs (and schema-driven clients and fuzzers) show it: digits, 4
# workers, the elastic rule, a straggler; valid as it stands.
JOB_EXAMPLE: dict[str, Any] = {
    "name": "digits-elastic",
    "model": {"name": "mlp", "hidden": [64]},
    "dataset": {"name": "digits"},
    "workers": 4,
    "batch_size": 32,
    "steps": 300,
    "optimizer": {"lr": 0.1, "momentum": 0.9},
    "mode": {"name": "elastic", "beta": 0.5, "max_lag": 2},
    "checkpoint": {"interval_steps": 50},
    "faults": [{"kind": "delay", "workers": [3], "delay_ms": 20.0, "distribution": "pareto"}],
}


class JobCreate(JobSpec):
    """Body of ``POST /jobs``: a job spec, exactly as in a YAML spec file."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"workers": 3}]})

    workers: int = Field(ge=1, le=4096, description="new number of workers")


class FaultCreate(FaultSpec):
    """Body of ``POST /jobs/{id}/faults``: one fault, as in a spec's ``faults`` list.

    Without a trigger (``at_step``, ``at_s``, ``probability``, ``steps``) it fires now.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"kind": "crash", "workers": [1], "rejoin_after_s": 2.0}],
        }
    )


JobBody = Annotated[JobCreate, WrapValidator(strictly(JobCreate))]
FaultBody = Annotated[FaultCreate, WrapValidator(strictly(FaultCreate))]
ScaleBody = Annotated[ScaleRequest, WrapValidator(strictly(ScaleRequest))]


class WorkerPublic(BaseModel):
    id: int
    state: str
    node: str | None = None
    step: int | None = None


class JobPublic(BaseModel):
    """A job as listed: identity, state, progress and the latest consistency numbers."""

    id: str
    name: str
    state: JobState
    terminal: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    step: int
    total_steps: int | None
    progress: float = Field(description="step / total_steps, in [0, 1]")
    workers: list[WorkerPublic]
    b_hat_max: float | None
    b_hat_mean: float | None
    bound: float | None
    error: str | None
    drill_id: str | None
    # budgets: why a pending job waits (service.jobs admission), else None
    waiting: str | None = Field(
        default=None, description="why a pending job waits (memory, processes, resources)"
    )

    @classmethod
    def of(cls, row: JobRow, **extra: Any) -> Self:
        """The public view of ``row``; ``extra`` fills the fields of a subclass."""
        st = row.status
        workers = []
        for w in st.get("workers") or []:
            if isinstance(w, dict) and isinstance(w.get("id"), int):
                workers.append(
                    WorkerPublic(
                        id=w["id"],
                        state=str(w.get("state", "unknown")),
                        node=None if w.get("node") is None else str(w.get("node")),
                        step=w.get("step") if isinstance(w.get("step"), int) else None,
                    )
                )
        total = row.total_steps
        progress = (
            1.0
            if row.state == "succeeded"
            else (min(1.0, max(0.0, row.step / total)) if total else 0.0)
        )
        return cls(
            id=row.id,
            name=row.name,
            state=JobState(row.state),
            terminal=row.state in ("succeeded", "failed", "cancelled"),
            created_at=ts(row.created_at),
            updated_at=ts(row.updated_at),
            started_at=ts_opt(row.started_at),
            finished_at=ts_opt(row.finished_at),
            step=row.step,
            total_steps=total,
            progress=progress,
            workers=workers,
            b_hat_max=_f(st.get("b_hat_max")),
            b_hat_mean=_f(st.get("b_hat_mean")),
            bound=_f(st.get("bound")),
            # a failed job always says why (rows written before reasons were required)
            error=row.error or (NO_REASON if row.state == JobState.FAILED.value else None),
            drill_id=row.drill_id,
            waiting=_waiting(row),
            **extra,
        )


class JobErrorDetail(BaseModel):
    """A job's failure for operators: the public reason and the full text behind it."""

    job_id: str
    state: JobState
    error: str | None = Field(description="the public reason (as in GET /jobs/{id})")
    detail: str | None = Field(
        description="the full record: messages and tracebacks as the service received them "
        "(may name paths, pids and hosts of the cluster: not for end users)"
    )


def _waiting(row: JobRow) -> str | None:
    """The reason a pending job waits (the job manager keeps it in its status)."""
    why = row.status.get("waiting") if row.state == "pending" else None
    return why if isinstance(why, str) else None


class CheckpointPublic(BaseModel):
    step: int
    wall_time: datetime
    path: str | None
    detail: str


class JobDetail(JobPublic):
    """One job in full: its spec, summary (once finished) and checkpoint records."""

    spec: dict[str, Any]
    summary: dict[str, Any] | None
    checkpoints: list[CheckpointPublic]


class JobList(BaseModel):
    items: list[JobPublic]
    total: int = Field(description="jobs matching the filter, over all pages")
    limit: int
    offset: int


class MetricPublic(BaseModel):
    """One metric record (a training step or an evaluation); unknown keys pass through."""

    model_config = ConfigDict(extra="allow")

    seq: int
    kind: str
    step: int
    time_s: float | None = None
    wall_time: float | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    b_hat: float | None = None
    b_hat_max: float | None = None
    bound: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    workers: Any = None


class MetricsPage(BaseModel):
    job_id: str
    items: list[MetricPublic]
    last_seq: int | None = Field(description="pass as after_seq to read only newer records")


class SeriesPublic(BaseModel):
    """One kind of a job's metric records, as many as a chart needs."""

    items: list[MetricPublic] = Field(description="oldest first")
    thinned: bool = Field(
        description="records were left out: the kind has more than max_points, and these are "
        "the first record of each of max_points - 1 equal spans of seq, and the last one"
    )


class HistoryPublic(BaseModel):
    """A job's charts in one response; the stream goes on from ``last_seq``/``last_event_id``."""

    job_id: str
    steps: SeriesPublic
    evals: SeriesPublic
    events: list[EventPublic] = Field(description="the latest events, oldest first")
    last_seq: int = Field(description="pass as after_seq to the stream (-1: no records yet)")
    last_event_id: int = Field(description="pass as after_id to the stream (0: no events yet)")


class EventPublic(BaseModel):
    id: int = Field(description="store-wide order; pass the last one as after_id")
    source: Literal["service", "runner"]
    seq: int | None
    wall_time: datetime
    time_s: float | None
    step: int | None
    kind: str = Field(description="what the event is about (core.events.EventKind)")
    target: str | None
    detail: str = Field(description="for people: may be reworded, never parse it")
    fault: str | None = Field(
        default=None, description="the fault kind the event is about (core.events.FaultKind)"
    )
    guard: str | None = Field(
        default=None,
        description="a guard event's action: warn, tighten, fail or rollback (null otherwise)",
    )

    @classmethod
    def of(cls, e: EventRow) -> EventPublic:
        return cls(
            id=e.id,
            source=cast(Literal["service", "runner"], e.source),
            seq=e.seq,
            wall_time=ts(e.wall_time),
            time_s=_f(e.time_s),
            step=e.step,
            kind=e.kind,
            target=e.target,
            detail=e.detail,
            fault=e.fault,
            guard=e.guard,
        )


class EventsPage(BaseModel):
    job_id: str
    items: list[EventPublic]
    last_id: int | None


# -- drills -----------------------------------------------------------------------------------


class DrillCreate(DrillSpec):
    """Body of ``POST /drills``: a drill file's content (``name``, ``job``, ``criteria``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "crash-one",
                    "job": {
                        **JOB_EXAMPLE,
                        "name": "drill-crash-one",
                        "faults": [{"kind": "crash", "workers": [1], "at_step": 100}],
                    },
                    "criteria": {"finished": True, "min_test_accuracy": 0.9},
                }
            ]
        }
    )


class DrillCheck(BaseModel):
    name: str
    passed: bool | None = Field(description="None: the runtime gave no data to check it")
    observed: Any = None
    expected: Any = None
    detail: str = ""


class DrillReport(BaseModel):
    passed: bool
    checks: list[DrillCheck]
    not_evaluated: list[str] = Field(default_factory=list)
    job_id: str | None = None
    job_state: str | None = None


DrillStateName = Literal["running", "passed", "failed", "error"]


class DrillPublic(BaseModel):
    id: str
    name: str
    state: DrillStateName
    created_at: datetime
    updated_at: datetime
    job_id: str | None
    report: DrillReport | None
    error: str | None

    @classmethod
    def of(cls, d: DrillRow) -> DrillPublic:
        return cls(
            id=d.id,
            name=d.name,
            state=cast(DrillStateName, d.state),
            created_at=ts(d.created_at),
            updated_at=ts(d.updated_at),
            job_id=d.job_id,
            report=None if d.report is None else DrillReport.model_validate(clean(d.report)),
            error=d.error,
        )


# -- health -----------------------------------------------------------------------------------


class HealthPublic(BaseModel):
    status: Literal["ok"]


class ReadyPublic(BaseModel):
    status: Literal["ready", "not ready"]
    store: bool
    ray: bool
    supervisor: bool
    detail: str = ""


DrillBody = Annotated[DrillCreate, WrapValidator(strictly(DrillCreate))]
