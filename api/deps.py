"""Request dependencies as ``Annotated`` aliases, and bearer-token auth.

Routes ask for what they need by type (``jobs: JobsDep``); the objects live on
``app.state`` (set up by :func:`api.main.create_app`). The dependencies are ``async def``:
FastAPI runs a plain ``def`` dependency in its thread pool, a hop that costs more than
what these do. Mutating routes carry
``dependencies=[RequireToken]``: when the server has a token, a request without one is
refused with 401 and a request with a wrong one with 403, before its body is looked at:
FastAPI reads and parses a body before it runs any dependency, so the routers of such
routes use :class:`TokenFirstRoute`, which checks the token before the route's handler
starts (malformed JSON from a client without the token is a 401, not a 422).
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from api.streams import StreamHub, Subscription, TooManyStreams
from service.drills.service import DrillService
from service.jobs import JobManager
from service.settings import Settings
from service.store import JobRow, Store


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def get_jobs(request: Request) -> JobManager:
    jobs: JobManager = request.app.state.jobs
    return jobs


class DetailCache:
    """Serialised ``GET /jobs/{id}`` bodies, each for one version (``updated_at``) of its
    job, the ``max_jobs`` most recently read kept. Used from the event loop only.

    A running job changes once per supervisor poll (0.5 s), a finished one never: readers
    polling it (dashboards, ``submit --watch``, a load test) mostly get bytes built once.
    """

    def __init__(self, max_jobs: int = 1024) -> None:
        self.max_jobs = max_jobs
        self._bodies: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, job_id: str, version: float) -> bytes | None:
        hit = self._bodies.get(job_id)
        if hit is None or hit[0] != version:
            return None
        self._bodies.move_to_end(job_id)
        return hit[1]

    def put(self, job_id: str, version: float, body: bytes) -> None:
        self._bodies[job_id] = (version, body)
        self._bodies.move_to_end(job_id)
        while len(self._bodies) > self.max_jobs:
            self._bodies.popitem(last=False)


async def get_detail_cache(request: Request) -> DetailCache:
    cache: DetailCache = request.app.state.detail_cache
    return cache


async def get_drills(request: Request) -> DrillService:
    drills: DrillService = request.app.state.drills
    return drills


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
DrillsDep = Annotated[DrillService, Depends(get_drills)]
DetailCacheDep = Annotated[DetailCache, Depends(get_detail_cache)]

# Ids are 12 hex digits; anything up to 64 characters is looked up (and not found: 404).
JobId = Annotated[str, Path(min_length=1, max_length=64, description="job id")]
DrillId = Annotated[str, Path(min_length=1, max_length=64, description="drill id")]

_bearer = HTTPBearer(auto_error=False, description="the server's ESGD_TOKEN")


async def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse a mutating request without the server's bearer token (when one is set).

    Raises:
        HTTPException: 401 without an ``Authorization: Bearer`` header, 403 with a wrong token.
    """
    check_token(settings, None if credentials is None else credentials.credentials)


def check_token(settings: Settings, presented: str | None) -> None:
    """Compare the bearer token ``presented`` (``None``: none was sent) with the server's.

    Raises:
        HTTPException: 401 without a token, 403 with a wrong one.
    """
    expected = settings.token_value
    if expected is None:
        return
    if presented is None:
        raise HTTPException(
            status_code=401,
            detail="this route needs a bearer token: send 'Authorization: Bearer <token>' "
            "with the server's ESGD_TOKEN (the CLI reads it from ESGD_TOKEN or --token)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode()):
        raise HTTPException(
            status_code=403,
            detail="the bearer token is not the server's: use the ESGD_TOKEN the server "
            "was started with",
        )


RequireToken = Depends(require_token)


def bearer_of(request: Request) -> str | None:
    """The token of the request's ``Authorization: Bearer`` header (``None`` if it has none),
    read as :class:`~fastapi.security.HTTPBearer` reads it."""
    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    return token if scheme.lower() == "bearer" and token else None


class TokenFirstRoute(APIRoute):
    """A route that checks, before FastAPI reads its body: the token (if the route depends
    on :data:`RequireToken`), then that the body is UTF-8 (FastAPI answers a body that is
    not with a bare 400 "error parsing the body"; this says what to send, as a 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        needs_token = any(d.dependency is require_token for d in self.dependencies)
        has_body = self.body_field is not None
        if not needs_token and not has_body:
            return handler

        async def checked_first(request: Request) -> Response:
            if needs_token:
                check_token(request.app.state.settings, bearer_of(request))
            if has_body:
                check_utf8(await request.body())  # cached: the handler reads it again
            return await handler(request)

        return checked_first


def check_utf8(body: bytes) -> None:
    """Refuse a request body that is not UTF-8 (JSON is).

    Raises:
        HTTPException: 422 naming the first offending byte.
    """
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(
            status_code=422,
            detail=f"the request body is not UTF-8 (byte {exc.start}: "
            f"{body[exc.start : exc.start + 1]!r}); send a JSON object encoded as UTF-8 with "
            "Content-Type: application/json",
        ) from None


async def existing_job(job_id: JobId, jobs: JobsDep) -> JobRow:
    """The job named in the path (404 if unknown), resolved before any streaming starts.

    One primary-key read of SQLite (WAL: never blocked by a writer), done on the event loop
    like every dependency here: a hop to the thread pool would cost more than the read.
    """
    return jobs.get(job_id)


ExistingJob = Annotated[JobRow, Depends(existing_job)]


async def stream_subscription(job: ExistingJob, request: Request) -> AsyncIterator[Subscription]:
    """A place among the live streams for the job in the path, freed when its stream ends
    (however it ends: this exits after the response).

    Raises:
        HTTPException: 429 when ``max_stream_subscribers`` streams are open already.
    """
    hub: StreamHub = request.app.state.streams
    try:
        sub = await hub.subscribe(job.id)
    except TooManyStreams as exc:
        # 5 s: a browser's EventSource retries after ~3 s by itself; a script should wait
        raise HTTPException(
            status_code=429, detail=str(exc), headers={"Retry-After": "5"}
        ) from None
    try:
        yield sub
    finally:
        sub.close()


StreamSubscription = Annotated[Subscription, Depends(stream_subscription)]
