"""The FastAPI app: mounts the routers; :func:`create_app` wires settings, store and jobs.

Start-up (lifespan): open the store, connect to Ray (in-process or ``RAY_ADDRESS``),
reconcile the jobs the store knows, start the supervisor. Shut-down stops supervising;
jobs keep running in Ray and are re-attached by the next start.
"""

from __future__ import annotations

import gc
import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from api.deps import DetailCache
from api.errors import install_error_handlers
from api.loopwatch import LoopWatch
from api.middleware import BodySizeLimit, RequestTiming
from api.routes import dashboard, drills, health, jobs, metrics
from api.schemas import ErrorPublic
from api.streams import StreamHub
from service import ray_conn
from service.drills.service import DrillService
from service.jobs import Cluster, JobManager
from service.settings import Settings
from service.store import Store
from service.tasks import runtime_env

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    manager: JobManager | None = None,
    cluster: Cluster | None = None,
    connect_ray: bool = True,
) -> FastAPI:
    """Build the app.

    Args:
        settings: service settings.
        manager: a prebuilt job manager (tests inject one with a fake runner backend);
            by default one is built on a store under ``settings.state_dir``.
        cluster: the cluster view for admission (default: the connected Ray cluster).
        connect_ray: connect to Ray on start-up (False only in tests of pure HTTP logic).
    """
    store = manager.store if manager is not None else Store(settings.db_path, settings.retention())
    jobs_mgr = manager or JobManager(settings, store)
    drill_svc = DrillService(jobs_mgr, store)
    # the live streams' one reader per job; the store changes once per supervisor poll
    streams = StreamHub(
        store, max_subscribers=settings.max_stream_subscribers, poll_s=settings.poll_interval_s
    )

    # the API's own metrics (GET /metrics): request durations, the event loop's lag
    http_registry = CollectorRegistry(auto_describe=True)
    loop_watch = LoopWatch(http_registry)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:  # FastAPI passes the app
        the_cluster = cluster
        if connect_ray:
            # the operator's runtime_env (ESGD_RUNTIME_ENV_*) ships user tasks to every actor
            await run_in_threadpool(
                partial(ray_conn.connect, runtime_env=runtime_env(settings)), settings.ray_address
            )
            # the runtime (torch, the actors) is needed by the first job: load it now, so
            # that it is frozen below with the rest of what lives as long as the process
            await run_in_threadpool(importlib.import_module, "service.runner")
            if the_cluster is None:
                the_cluster = ray_conn.RayCluster()
        await run_in_threadpool(jobs_mgr.start, the_cluster)
        await run_in_threadpool(drill_svc.reconcile)
        # Everything alive now (Ray, torch, the app: ~10^6 objects) lives as long as the
        # process: out of the collector's sight, a full collection stops the event loop for
        # a few ms instead of 70-200 ms (measured under bench.load; the p99 of every route).
        gc.freeze()
        log.info("%d start-up objects moved out of the collector's sight", gc.get_freeze_count())
        loop_watch.start()
        log.info("elastic-sgd service ready on %s:%d", settings.host, settings.port)
        try:
            yield
        finally:
            await loop_watch.stop()
            await streams.close()
            await run_in_threadpool(jobs_mgr.stop)
            if connect_ray:
                # a cluster's detached jobs train on; an embedded Ray is stopped whole (left
                # to the process's exit, its agents would outlive it)
                await run_in_threadpool(ray_conn.disconnect)

    app = FastAPI(
        title="elastic-sgd",
        version="0.1.0",
        summary="Elastic-consistency distributed SGD as a service, on Ray actors",
        lifespan=lifespan,
        # any route may meet a bug: documented, so that clients can read its body
        responses={500: {"model": ErrorPublic, "description": "a bug in elastic-sgd (logged)"}},
    )
    app.state.settings = settings
    app.state.store = store
    app.state.jobs = jobs_mgr
    app.state.drills = drill_svc
    app.state.detail_cache = DetailCache()
    app.state.streams = streams
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    # outermost: times the whole request, a 413 from the body limit included
    app.state.http_registry = http_registry
    app.add_middleware(RequestTiming, registry=http_registry)
    for r in (jobs.router, drills.router, health.router, metrics.router, dashboard.router):
        app.include_router(r)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    return app
