"""``/jobs``: submit, list, inspect, follow (SSE), cancel, scale, inject faults, download."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api.deps import (
    DetailCacheDep,
    ExistingJob,
    JobId,
    JobsDep,
    RequireToken,
    StoreDep,
    StreamSubscription,
    TokenFirstRoute,
)
from api.routes import links
from api.schemas import (
    CheckpointPublic,
    ErrorPublic,
    EventPublic,
    EventsPage,
    FaultBody,
    HistoryPublic,
    JobBody,
    JobDetail,
    JobErrorDetail,
    JobList,
    JobPublic,
    MetricPublic,
    MetricsPage,
    ScaleBody,
    SeriesPublic,
    clean,
    ts,
)
from api.streams import CURSOR_PATTERN, Cursor, sse_stream
from core.spec import FaultSpec
from core.state import JobState
from service.store import JobRow, Store

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=TokenFirstRoute)

_E = {"model": ErrorPublic}
# Documented refusals, shared by the routes below.
_AUTH: dict[int | str, dict[str, Any]] = {401: _E, 403: _E}
_ID: dict[int | str, dict[str, Any]] = {404: _E, 422: _E}
_BODY: dict[int | str, dict[str, Any]] = {413: _E, 422: _E}
_STATE: dict[int | str, dict[str, Any]] = {409: _E}


# What a submitted job's id leads to (FastAPI's operation ids: function, path, method).
_JOB_LINKS = links(
    "job_id",
    GetJob="get_job_jobs__job_id__get",
    GetMetrics="get_metrics_jobs__job_id__metrics_get",
    GetEvents="get_events_jobs__job_id__events_get",
    GetError="get_job_error_jobs__job_id__error_get",
    GetModel="get_model_jobs__job_id__model_get",
    ScaleJob="scale_job_jobs__job_id__scale_post",
    InjectFault="inject_fault_jobs__job_id__faults_post",
    CancelJob="cancel_job_jobs__job_id__cancel_post",
)


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """``model`` as JSON, serialised once by pydantic: returning a ``Response`` spares FastAPI
    validating the model against the route's ``response_model`` again (the hot routes)."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def detail_of(row: JobRow, store: Store, spec: dict[str, Any] | None = None) -> JobDetail:
    return JobDetail.of(
        row,
        spec=spec if spec is not None else store.get_spec(row.id) or {},
        summary=None if row.summary is None else clean(row.summary),
        checkpoints=[
            CheckpointPublic(
                step=c.step,
                wall_time=ts(c.wall_time),
                path=c.path,
                detail=c.detail,
            )
            for c in store.checkpoints(row.id)
        ],
    )


@router.post(
    "",
    status_code=201,
    response_model=JobDetail,
    dependencies=[RequireToken],
    responses={**_AUTH, **_BODY, 201: {"links": _JOB_LINKS}},
    summary="Submit a job (a job spec, as in a YAML file)",
)
async def create_job(body: JobBody, jobs: JobsDep, store: StoreDep) -> Response:
    # on the event loop: it awaits the insert's commit (see JobManager.submit_async);
    # the body is already a validated JobSpec (JobCreate adds nothing to it)
    row = await jobs.submit_async(body)
    return json_response(detail_of(row, store, body.model_dump(mode="json")), 201)


@router.get("", summary="List jobs, newest first", responses={422: _E})
def list_jobs(
    store: StoreDep,
    state: Annotated[list[JobState] | None, Query(description="only these states")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> JobList:
    rows, total = store.list_jobs(states=state, limit=limit, offset=offset)
    return JobList(items=[JobPublic.of(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/{job_id}",
    response_model=JobDetail,
    responses={**_ID, 304: {"description": "unchanged since the ETag sent in If-None-Match"}},
    summary="One job: state, progress, spec, summary",
    description="The response's `ETag` names this version of the job; send it back in "
    "`If-None-Match` to get `304 Not Modified` until the job changes (a running job changes "
    "once per supervisor poll).",
)
async def get_job(
    job_id: JobId,
    jobs: JobsDep,
    store: StoreDep,
    cache: DetailCacheDep,
    if_none_match: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    # The most polled route: on the event loop (indexed reads of SQLite, see
    # api.deps.existing_job), served from the DetailCache while the job's row is unchanged.
    version = jobs.version(job_id)
    etag = f'"{job_id}-{version!r}"'
    if if_none_match == etag:
        return Response(status_code=304, headers={"ETag": etag})
    body = cache.get(job_id, version)
    if body is None:
        row = jobs.get(job_id)
        etag = f'"{job_id}-{row.updated_at!r}"'
        body = detail_of(row, store).model_dump_json().encode()
        cache.put(job_id, row.updated_at, body)
    return Response(body, media_type="application/json", headers={"ETag": etag})


@router.get("/{job_id}/metrics", responses=_ID, summary="Metric records, oldest first")
def get_metrics(
    job: ExistingJob,
    store: StoreDep,
    since_step: Annotated[
        int | None, Query(ge=0, le=1_000_000_000, description="only records with step >= this")
    ] = None,
    after_seq: Annotated[
        int | None,
        Query(ge=-1, le=1_000_000_000_000, description="only records newer than this seq"),
    ] = None,
    kind: Literal["step", "eval"] | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> MetricsPage:
    recs = store.metrics(job.id, since_step=since_step, after_seq=after_seq, kind=kind, limit=limit)
    items = [MetricPublic.model_validate(clean(r)) for r in recs]
    return MetricsPage(job_id=job.id, items=items, last_seq=items[-1].seq if items else after_seq)


@router.get("/{job_id}/events", responses=_ID, summary="Events (state changes, faults...)")
def get_events(
    job: ExistingJob,
    store: StoreDep,
    after_id: Annotated[int | None, Query(ge=0, le=1_000_000_000_000)] = None,
    kind: Annotated[str | None, Query(min_length=1, max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> EventsPage:
    rows = store.events(job.id, after_id=after_id, kind=kind, limit=limit)
    return EventsPage(
        job_id=job.id,
        items=[EventPublic.of(e) for e in rows],
        last_id=rows[-1].id if rows else after_id,
    )


@router.get(
    "/{job_id}/history",
    response_model=HistoryPublic,
    responses=_ID,
    summary="A job's charts in one request: step and eval records (thinned), latest events",
)
def get_history(
    job: ExistingJob,
    store: StoreDep,
    max_points: Annotated[
        int, Query(ge=2, le=20_000, description="records per kind at most (steps, evals)")
    ] = 2000,
    events: Annotated[int, Query(ge=0, le=10_000, description="latest events to include")] = 200,
) -> Response:
    """What a dashboard draws first, in one response; then it follows ``/stream`` from
    ``last_seq`` and ``last_event_id`` for what is new.

    A kind with more than ``max_points`` records is thinned on the server: the first record
    of each of ``max_points - 1`` equal spans of ``seq`` (the job's counter of records and
    events, so equal spans of its progress) and the last record; kept records are real
    ones. A 100,000-step job comes as 2,000 points per chart in one query
    (:meth:`service.store.Store.metric_history`).
    """
    history = store.metric_history(job.id, max_points=max_points)
    recent = store.recent_events(job.id, events) if events else []
    series = {
        kind: SeriesPublic(
            items=[MetricPublic.model_validate(clean(r)) for r in s.records], thinned=s.thinned
        )
        for kind, s in history.items()
    }
    empty = SeriesPublic(items=[], thinned=False)
    last_seqs = [s.records[-1]["seq"] for s in history.values() if s.records]
    # without events asked for, the stream still starts after the latest one
    last_event_id = (recent[-1].id if recent else 0) if events else store.stream_head(job.id)[1]
    body = HistoryPublic(
        job_id=job.id,
        steps=series.get("step", empty),
        evals=series.get("eval", empty),
        events=[EventPublic.of(e) for e in recent],
        last_seq=max(last_seqs, default=-1),
        last_event_id=last_event_id,
    )
    return json_response(body)


@router.get(
    "/{job_id}/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "the stream (text/event-stream)",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **_ID,
        429: _E,
    },
    summary="Server-sent events: 'job' (state/progress), 'metrics', 'event', then 'end'",
    description="Starts after `after_seq`/`after_id` (from `/history`), or after the cursor "
    "in `Last-Event-ID`, which wins. 'metrics' is a JSON array of new metric records in `seq` "
    "order; each 'metrics' and 'event' carries the cursor just after it as its SSE `id`, "
    "which a browser sends back when it reconnects. All streams of a job "
    "share one reader of the store; one that falls too far behind is closed (reconnect "
    "with `Last-Event-ID`). At most `max_stream_subscribers` streams are open at once: "
    "429 past it.",
)
async def stream(
    sub: StreamSubscription,
    after_seq: Annotated[int, Query(ge=-1, le=1_000_000_000_000)] = -1,
    after_id: Annotated[int, Query(ge=0, le=1_000_000_000_000)] = 0,
    last_event_id: Annotated[
        str | None,
        Header(
            max_length=40,
            pattern=CURSOR_PATTERN,
            description="'<seq>:<event id>', the `id` of the last event received",
        ),
    ] = None,
) -> StreamingResponse:
    cursor = Cursor(after_seq, after_id) if last_event_id is None else Cursor.parse(last_event_id)
    # a chunk of messages per write (api.streams): as FastAPI's own SSE responses, without
    # its one write per message
    return StreamingResponse(
        sse_stream(sub, cursor),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    dependencies=[RequireToken],
    responses={**_AUTH, **_ID, **_STATE, 413: _E},
    summary="Cancel a job (pending ones at once, live ones when the coordinator stops)",
)
def cancel_job(job_id: JobId, jobs: JobsDep) -> JobPublic:
    return JobPublic.of(jobs.cancel(job_id))


@router.post(
    "/{job_id}/scale",
    status_code=202,
    dependencies=[RequireToken],
    responses={**_AUTH, **_ID, **_STATE, **_BODY},
    summary="Change the number of workers of a running job",
)
def scale_job(job_id: JobId, body: ScaleBody, jobs: JobsDep) -> JobPublic:
    return JobPublic.of(jobs.scale(job_id, body.workers))


@router.post(
    "/{job_id}/faults",
    status_code=202,
    dependencies=[RequireToken],
    responses={**_AUTH, **_ID, **_STATE, **_BODY},
    summary="Inject a fault into a running job",
)
def inject_fault(job_id: JobId, body: FaultBody, jobs: JobsDep) -> JobPublic:
    fault = FaultSpec.model_validate(body.model_dump())
    return JobPublic.of(jobs.inject(job_id, fault))


@router.get(
    "/{job_id}/error",
    dependencies=[RequireToken],
    responses={**_AUTH, **_ID},
    summary="A job's full failure record, tracebacks included (operators: needs the token)",
    description="`error` is the public reason shown by `GET /jobs/{job_id}`; `detail` is the "
    "full text the service received (Ray tracebacks, paths, hosts), also in the server log.",
)
def get_job_error(job: ExistingJob, store: StoreDep) -> JobErrorDetail:
    found = store.error_detail(job.id)
    detail = None if found is None else found[1]
    return JobErrorDetail(
        job_id=job.id, state=JobState(job.state), error=JobPublic.of(job).error, detail=detail
    )


@router.get(
    "/{job_id}/model",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "torch.save of the model's state_dict",
        },
        **_ID,
        **_STATE,
    },
    summary="Download the latest model of record",
)
def get_model(job_id: JobId, jobs: JobsDep) -> Response:
    data = jobs.model_bytes(job_id)
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-model.pt"'},
    )
