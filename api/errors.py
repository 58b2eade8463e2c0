"""Exception handlers: every refusal is a JSON :class:`~api.schemas.ErrorPublic` that says
what went wrong and what to change; a 500 means a bug (logged with its traceback).

=========================  ====  =============================================
error                      code  when
=========================  ====  =============================================
SpecError / validation     422   a field is refused (``errors`` has the paths)
JobNotFound/DrillNotFound  404   unknown id
InvalidTransition          409   the job's state forbids the action
InvalidRequest             422   a value the runtime refused
other ElasticSGDError      400   any other refusal the user can act on
HTTPException              as    401/403 auth, 404 unknown route, 405, 413
Exception                  500   a bug
=========================  ====  =============================================
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import MAX_FIELD_ERRORS, ErrorPublic, FieldError
from core.errors import (
    ElasticSGDError,
    InvalidRequest,
    InvalidTransition,
    JobNotFound,
    SpecError,
)
from core.spec import format_error_list
from service.drills.service import DrillNotFound

log = logging.getLogger(__name__)


def error_response(
    status: int,
    detail: str,
    problems: Sequence[tuple[str, str]] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An :class:`ErrorPublic` response; only the first :data:`MAX_FIELD_ERRORS` problems are
    listed, the rest counted in ``errors_omitted``."""
    body = ErrorPublic(
        detail=detail,
        errors=[FieldError(path=p, message=m) for p, m in problems[:MAX_FIELD_ERRORS]],
        errors_omitted=max(0, len(problems) - MAX_FIELD_ERRORS),
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=dict(headers or {}))


def request_problems(errors: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """FastAPI's validation errors as ``(path, message)``, with the CLI's wording.

    Body fields lose the ``body.`` prefix so that a spec field reads exactly as in the
    CLI (``mode.beta``); query and path parameters keep theirs (``query.limit``).
    """
    out: list[tuple[str, str]] = []
    for err in errors:
        loc = tuple(err.get("loc") or ())
        kind = err.get("type")
        where = loc[0] if loc else "body"
        if kind == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "")
            out.append(
                (
                    "body",
                    f"the request body is not valid JSON ({reason}); send a JSON "
                    "object with Content-Type: application/json",
                )
            )
            continue
        if where == "body" and len(loc) == 1:
            if kind == "missing":
                out.append(("body", "a JSON object body is required"))
            else:
                out.append(
                    (
                        "body",
                        str(err.get("msg", "invalid body")).removeprefix("Value error, ")
                        + " (send a JSON object)",
                    )
                )
            continue
        fixed = dict(err)
        fixed["loc"] = loc[1:] if where == "body" else loc
        out.extend(format_error_list([fixed]))
    return out


def _summary(problems: Sequence[tuple[str, str]], what: str) -> str:
    lines = "; ".join(f"{p}: {m}" for p, m in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return f"{what}: {lines}{more}"


async def _validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = request_problems(list(exc.errors()))
    return error_response(422, _summary(problems, "invalid request"), problems)


async def _spec_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SpecError)
    return error_response(422, _summary(exc.problems, "invalid request"), exc.problems)


async def _elastic(_request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, JobNotFound | DrillNotFound):
        return error_response(404, str(exc))
    if isinstance(exc, InvalidTransition):
        return error_response(409, str(exc))
    if isinstance(exc, InvalidRequest):
        return error_response(422, str(exc))
    return error_response(400, str(exc))


# The methods the API documents (it serves no others).
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

_ROUTE_HINT = {
    404: "no such route: see GET /docs for the API",
    405: "this method is not allowed on this route: see GET /docs for the API",
}


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    headers = dict(exc.headers or {})
    if exc.status_code in _ROUTE_HINT and detail in ("Not Found", "Method Not Allowed"):
        detail = f"{request.method} {request.url.path}: {_ROUTE_HINT[exc.status_code]}"
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(exc.status_code, str(detail), headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves on the request's path (Starlette's own
    ``Allow`` names only the first route that matches the path, e.g. ``POST`` for ``/jobs``,
    which also has a ``GET``). ``HEAD`` is left out, as the API's documentation does."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    ]


async def _bug(request: Request, _exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        500,
        "internal error: this is a bug in elastic-sgd, not a problem with the request; "
        "it was logged on the server",
    )


class BugsAnswered:
    """Answer a bug (an exception no handler took) with the 500 of :func:`_bug`, and do not
    raise it further.

    Starlette's outermost middleware also answers it, but then raises it again, and uvicorn
    closes the connection of a request that raised: a client's keep-alive connection would
    not outlive one bug. Installed innermost (just outside the exception handlers), so that
    the body limit and the request timing see the 500 like any answer.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise  # half an answer is out: only closing the connection can end it
            response = await _bug(Request(scope, receive), exc)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above (Starlette calls each as ``handler(request, exc)``: a
    ``_``-prefixed argument is one a handler does not need), and :class:`BugsAnswered`
    (call this before adding other middleware: it must be the innermost)."""
    app.add_middleware(BugsAnswered)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(SpecError, _spec_error)
    app.add_exception_handler(ElasticSGDError, _elastic)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _bug)
