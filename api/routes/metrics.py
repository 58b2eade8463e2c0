"""``GET /metrics``: Prometheus text format, computed from the store at scrape time.

Per live job (starting, running, recovering): step, samples/s, loss, B-hat (max, mean) and
its bound, live workers. Over all jobs: jobs by state, faults and recoveries (counters).
Then the API's own ``esgd_http_request_duration_seconds`` histogram (by method, route
template and status; see :class:`api.middleware.RequestTiming`) and
``esgd_event_loop_lag_seconds`` (how late the service's event loop ran a timer:
:class:`api.loopwatch.LoopWatch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.deps import StoreDep
from core.state import JobState
from service.store import Store

router = APIRouter(tags=["metrics"])

# Event kinds counted as faults and as recoveries (runner events; see service/runner.py).
FAULT_KINDS = ("fault",)
RECOVERY_KINDS = ("restart", "recover")


def _num(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


class StoreCollector(Collector):
    """Reads the store on every scrape; holds no state of its own."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counts = self.store.count_by_state()
        jobs = GaugeMetricFamily(
            "esgd_jobs", "Jobs known to the service, by state", labels=["state"]
        )
        for s in JobState:
            jobs.add_metric([s.value], float(counts.get(s.value, 0)))
        yield jobs

        ev = self.store.event_counts([*FAULT_KINDS, *RECOVERY_KINDS])
        entered = self.store.state_entries(JobState.RECOVERING.value)
        faults = CounterMetricFamily("esgd_faults", "Fault events recorded, over all jobs")
        faults.add_metric([], float(sum(n for (_, k), n in ev.items() if k in FAULT_KINDS)))
        yield faults
        rec = CounterMetricFamily(
            "esgd_recoveries", "Recoveries (entries into 'recovering' and restarts), all jobs"
        )
        rec.add_metric(
            [],
            float(
                sum(n for (_, k), n in ev.items() if k in RECOVERY_KINDS) + sum(entered.values())
            ),
        )
        yield rec

        live, _ = self.store.list_jobs(states=[s.value for s in JobState if s.live], limit=1000)
        labels = ["job_id", "name"]
        fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "step": GaugeMetricFamily("esgd_job_step", "Steps applied", labels=labels),
            "total": GaugeMetricFamily("esgd_job_total_steps", "Steps to run", labels=labels),
            "sps": GaugeMetricFamily(
                "esgd_job_samples_per_second",
                "Training throughput (last step record)",
                labels=labels,
            ),
            "loss": GaugeMetricFamily(
                "esgd_job_loss", "Training loss (last step record)", labels=labels
            ),
            "bmax": GaugeMetricFamily(
                "esgd_job_b_hat_max", "Measured B-hat, max so far", labels=labels
            ),
            "bmean": GaugeMetricFamily(
                "esgd_job_b_hat_mean", "Measured B-hat, mean so far", labels=labels
            ),
            "bound": GaugeMetricFamily(
                "esgd_job_b_hat_bound", "Analytic bound on B", labels=labels
            ),
            "workers": GaugeMetricFamily("esgd_job_workers", "Workers in the job", labels=labels),
            "faults": CounterMetricFamily(
                "esgd_job_faults", "Fault events of the job", labels=labels
            ),
            "recoveries": CounterMetricFamily(
                "esgd_job_recoveries", "Recoveries of the job", labels=labels
            ),
        }
        for job in live:
            lv = [job.id, job.name]
            last = self.store.last_metric(job.id, "step") or {}
            st = job.status
            values = {
                "step": float(job.step),
                "total": _num(job.total_steps),
                "sps": _num(last.get("samples_per_s")),
                "loss": _num(last.get("loss")),
                "bmax": _num(st.get("b_hat_max")),
                "bmean": _num(st.get("b_hat_mean")),
                "bound": _num(st.get("bound")),
                "workers": float(len(st.get("workers") or [])),
                "faults": float(sum(ev.get((job.id, k), 0) for k in FAULT_KINDS)),
                "recoveries": float(
                    sum(ev.get((job.id, k), 0) for k in RECOVERY_KINDS) + entered.get(job.id, 0)
                ),
            }
            for key, v in values.items():
                if v is not None:
                    fams[key].add_metric(lv, v)
        yield from fams.values()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics",
)
def metrics(store: StoreDep, request: Request) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    # the jobs' numbers, read from the store now, then the API's own request timings
    body = generate_latest(registry) + generate_latest(request.app.state.http_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
