"""``/drills``: run a drill (a job with a fault plan and pass criteria) and read its report."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import DrillId, DrillsDep, RequireToken, TokenFirstRoute
from api.routes import links
from api.schemas import DrillBody, DrillPublic, ErrorPublic
from service.drills.spec import DrillSpec

router = APIRouter(prefix="/drills", tags=["drills"], route_class=TokenFirstRoute)

_E = {"model": ErrorPublic}


@router.post(
    "",
    status_code=202,
    dependencies=[RequireToken],
    responses={
        401: _E,
        403: _E,
        413: _E,
        422: _E,
        202: {
            "links": links(
                "drill_id",
                GetDrill="get_drill_drills__drill_id__get",
                GetDrillPlot="get_drill_plot_drills__drill_id__plot_png_get",  # 409 until it ends
            )
        },
    },
    summary="Start a drill; its report appears when its job ends",
)
def create_drill(body: DrillBody, drills: DrillsDep) -> DrillPublic:
    spec = DrillSpec.model_validate(body.model_dump())
    return DrillPublic.of(drills.submit(spec))


@router.get("/{drill_id}", responses={404: _E, 422: _E}, summary="A drill and its report")
def get_drill(drill_id: DrillId, drills: DrillsDep) -> DrillPublic:
    return DrillPublic.of(drills.get(drill_id))


@router.get(
    "/{drill_id}/plot.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, 404: _E, 409: _E, 422: _E},
    summary="A finished drill's plot: loss, test accuracy and B̂ over time, faults marked",
)
def get_drill_plot(drill_id: DrillId, drills: DrillsDep) -> FileResponse:
    return FileResponse(drills.plot_path(drill_id), media_type="image/png")
