"""``/drills``: run a drill (a job with a fault plan and pass criteria) and read its report."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import DrillId, DrillsDep, RequireToken
from api.schemas import DrillCreate, DrillPublic, ErrorPublic
from service.drill_jobs import DrillSpec

router = APIRouter(prefix="/drills", tags=["drills"])

_E = {"model": ErrorPublic}


@router.post(
    "",
    status_code=202,
    dependencies=[RequireToken],
    responses={401: _E, 403: _E, 413: _E, 422: _E},
    summary="Start a drill; its report appears when its job ends",
)
def create_drill(body: DrillCreate, drills: DrillsDep) -> DrillPublic:
    spec = DrillSpec.model_validate(body.model_dump())
    return DrillPublic.of(drills.submit(spec))


@router.get("/{drill_id}", responses={404: _E, 422: _E}, summary="A drill and its report")
def get_drill(drill_id: DrillId, drills: DrillsDep) -> DrillPublic:
    return DrillPublic.of(drills.get(drill_id))
