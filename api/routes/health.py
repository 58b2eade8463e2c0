"""``/healthz`` (the process answers) and ``/readyz`` (store, Ray and supervisor are up)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import JobsDep, StoreDep
from api.schemas import HealthPublic, ReadyPublic
from service import ray_conn

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> HealthPublic:
    return HealthPublic(status="ok")


@router.get(
    "/readyz",
    summary="Readiness: the store answers, Ray is connected, the supervisor runs",
    response_model=ReadyPublic,
    responses={503: {"model": ReadyPublic}},
)
def readyz(store: StoreDep, jobs: JobsDep) -> JSONResponse:
    ok_store = store.ping()
    # connected, and not between a lost GCS and the new connection (service.jobs)
    ok_ray = ray_conn.is_connected() and jobs.ray_ready
    ok_sup = jobs.healthy
    missing = [
        name
        for name, ok in (("store", ok_store), ("ray", ok_ray), ("supervisor", ok_sup))
        if not ok
    ]
    body = ReadyPublic(
        status="ready" if not missing else "not ready",
        store=ok_store,
        ray=ok_ray,
        supervisor=ok_sup,
        detail="" if not missing else f"not ready: {', '.join(missing)} (see the server log)",
    )
    return JSONResponse(body.model_dump(), status_code=200 if not missing else 503)
