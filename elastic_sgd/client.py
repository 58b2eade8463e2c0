"""A typed, synchronous client of the elastic-sgd service's HTTP API.

:class:`Client` wraps one ``httpx.Client`` (a pool of keep-alive connections) and speaks
the API's own models: it returns the pydantic models of :mod:`api.schemas` (``JobDetail``,
``JobList``, ``MetricsPage``, ...) and sends job specs and faults as the service's
validated models (:class:`~core.spec.JobSpec`, :class:`~core.spec.FaultSpec`) or as plain
mappings. Routes that change something (submit, cancel, scale, inject, drills, a job's
error record) send the bearer token given to the client; reads need none.

Failures are exceptions of :mod:`elastic_sgd.errors`: an error status is an
:class:`~elastic_sgd.errors.ApiError` subclass chosen by the status (422:
``ValidationFailed`` with the refused fields, 401: ``Unauthorized``, 409: ``Conflict``,
...), and no answer at all a :class:`~elastic_sgd.errors.ServiceUnreachable` naming the
URL. :meth:`Client.stream` follows a job live over server-sent events and resumes by
itself (``Last-Event-ID``) when the connection breaks off.

Example::

    with Client("http://127.0.0.1:8000", token="...") as c:
        job = c.submit("configs/digits_elastic.yaml")
        for m in c.stream_metrics(job.id):
            print(m.step, m.loss, m.b_hat)
        c.download_model(job.id, "model.pt")
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import httpx
import yaml
from pydantic import BaseModel, ValidationError

from api.schemas import (
    DrillPublic,
    DrillReport,
    EventPublic,
    EventsPage,
    HealthPublic,
    HistoryPublic,
    JobDetail,
    JobErrorDetail,
    JobList,
    JobPublic,
    MetricPublic,
    MetricsPage,
    ReadyPublic,
)
from core.errors import SpecError
from core.spec import FaultSpec, JobSpec, load_spec
from core.state import JobState
from elastic_sgd.errors import ServiceError, ServiceUnreachable, UnexpectedAnswer, error_of
from elastic_sgd.streams import (
    EventUpdate,
    MetricUpdate,
    SSEParser,
    StreamEnd,
    StreamItem,
    items_of,
)
from service.drills.spec import DrillSpec, parse_drill

M = TypeVar("M", bound=BaseModel)

SpecLike = JobSpec | Mapping[str, Any] | str | PathLike[str]
"""A job spec: a :class:`~core.spec.JobSpec`, a mapping (sent as it is: the service
validates it, strictly, as JSON), or the path of a YAML spec file (read and validated
here first, with the CLI's messages)."""
DrillLike = DrillSpec | Mapping[str, Any] | str | PathLike[str]
FaultLike = FaultSpec | Mapping[str, Any]

DEFAULT_URL = "http://127.0.0.1:8000"
# Seconds a stream may be silent before it counts as broken: the service sends a
# keep-alive comment every 15 s on an idle stream (fastapi.sse._PING_INTERVAL), so 60 s
# is four missed pings.
STREAM_READ_TIMEOUT_S = 60.0
# Times in a row a stream may break off (without an item in between) before
# :meth:`Client.stream` gives up; each reconnect resumes from the last cursor.
STREAM_RECONNECTS = 5
# Seconds between two reconnects of a stream (a dropped subscriber comes back at once,
# a restarting service needs a moment).
STREAM_RETRY_S = 0.5


class Client:
    """The service's HTTP API as typed methods.

    Args:
        url: the service's address, e.g. ``http://127.0.0.1:8000``.
        token: the service's bearer token (``ESGD_TOKEN`` of the server); routes that change
            something answer 401 without it when the server has one.
        timeout_s: seconds for connecting and for each read of an ordinary request.
        stream_read_timeout_s: seconds a live stream may be silent before it counts as broken.
        transport: an httpx transport to use instead of the network (for tests).

    The client holds a connection pool: close it (:meth:`close`) or use it as a context
    manager (``with Client(url) as c: ...``).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        stream_read_timeout_s: float = STREAM_READ_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.stream_read_timeout_s = stream_read_timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, transport=transport
        )

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool (the client cannot be used after)."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the wire ---------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; an error status raises.

        Args:
            method: the HTTP method.
            path: the route, e.g. ``/jobs``.
            **kwargs: passed to ``httpx.Client.request`` (``params``, ``json``, ``headers``).

        Raises:
            ApiError: the service answered with a status of 400 or more (the subclass
                follows the status; ``errors`` has the refused fields).
            ServiceUnreachable: no answer (connection refused, timeout, ...).
        """
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(self.url, _reason(exc)) from exc
        if r.status_code >= 400:
            raise error_of(r.status_code, r.content, method, path)
        return r

    def _get(self, path: str, model: type[M], params: Mapping[str, Any] | None = None) -> M:
        r = self.request("GET", path, params=_query(params))
        return self._parse(r, model)

    def _post(self, path: str, model: type[M], body: Any = None) -> M:
        r = self.request("POST", path, json=body)
        return self._parse(r, model)

    def _parse(self, r: httpx.Response, model: type[M]) -> M:
        """The answer's body as ``model``.

        Raises:
            UnexpectedAnswer: the body is not a ``model``.
        """
        try:
            return model.model_validate_json(r.content)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise UnexpectedAnswer(
                f"{r.request.method} {r.request.url.path} at {self.url} answered {r.status_code} "
                f"with a body that is not a {model.__name__} ({where}: {first['msg']}; "
                f"{exc.error_count()} problems): is this an elastic-sgd service of this version?"
            ) from None

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, spec: SpecLike) -> JobDetail:
        """Submit a job.

        Args:
            spec: a :class:`~core.spec.JobSpec`, a mapping (the service validates it), or the
                path of a YAML spec file.

        Returns:
            The job as the service accepted it (``state`` ``pending``; ``id`` names it).

        Raises:
            SpecError: a spec file that cannot be read or is invalid (nothing was sent).
            ValidationFailed: the service refused fields of the spec (``errors``).
            Unauthorized, Forbidden: the token is missing or wrong.
        """
        return self._post("/jobs", JobDetail, _spec_body(spec))

    def get(self, job_id: str) -> JobDetail:
        """One job in full: state, progress, spec, summary (once finished), checkpoints.

        Raises:
            NotFound: no job ``job_id``.
        """
        return self._get(f"/jobs/{job_id}", JobDetail)

    def list(
        self,
        states: Iterable[JobState | str] | None = None,
        *,
        limit: int = 50,
        offset: int = 0,
    ) -> JobList:
        """Jobs, newest first, a page at a time.

        Args:
            states: only jobs in these states (all if ``None``).
            limit: jobs per page (1 to 500).
            offset: jobs to skip (for the next pages).
        """
        params = {"state": [str(s) for s in states or ()], "limit": limit, "offset": offset}
        return self._get("/jobs", JobList, params)

    def wait(
        self, job_id: str, *, timeout_s: float | None = None, interval_s: float = 0.5
    ) -> JobDetail:
        """Poll the job until it is terminal (succeeded, failed or cancelled).

        Args:
            job_id: the job.
            timeout_s: give up after this many seconds (``None``: wait as long as it takes).
            interval_s: seconds between polls.

        Returns:
            The terminal job.

        Raises:
            TimeoutError: still not terminal after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job.terminal:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {job_id} is still {job.state} after {timeout_s:g} s: wait longer "
                    "(timeout_s) or cancel it"
                )
            time.sleep(interval_s)

    def cancel(self, job_id: str) -> JobPublic:
        """Cancel a job (a pending one at once, a live one when its coordinator stops).

        Raises:
            NotFound: no job ``job_id``.
            Conflict: the job is already terminal.
        """
        return self._post(f"/jobs/{job_id}/cancel", JobPublic)

    def scale(self, job_id: str, workers: int) -> JobPublic:
        """Change the number of workers of a running job.

        Raises:
            Conflict: the job is not running.
            ValidationFailed: ``workers`` is outside the job's or the service's limits.
        """
        return self._post(f"/jobs/{job_id}/scale", JobPublic, {"workers": workers})

    def inject(self, job_id: str, fault: FaultLike) -> JobPublic:
        """Inject a fault into a running job (without a trigger it fires now).

        Args:
            job_id: the job.
            fault: a :class:`~core.spec.FaultSpec` or a mapping of its fields, as in a spec's
                ``faults`` list (e.g. ``{"kind": "crash", "workers": [1]}``).

        Raises:
            Conflict: the job is not running.
            ValidationFailed: the fault's fields were refused.
        """
        body = (
            fault.model_dump(mode="json", exclude_none=True)
            if isinstance(fault, FaultSpec)
            else dict(fault)
        )
        return self._post(f"/jobs/{job_id}/faults", JobPublic, body)

    def error(self, job_id: str) -> JobErrorDetail:
        """A job's full failure record, tracebacks included (needs the token)."""
        return self._get(f"/jobs/{job_id}/error", JobErrorDetail)

    # -- metrics and events -----------------------------------------------------------------

    def metrics(
        self,
        job_id: str,
        *,
        after_seq: int | None = None,
        since_step: int | None = None,
        kind: Literal["step", "eval"] | None = None,
        limit: int = 1000,
    ) -> MetricsPage:
        """A page of a job's metric records, oldest first.

        Args:
            job_id: the job.
            after_seq: only records newer than this ``seq`` (pass the page's ``last_seq`` to
                read on).
            since_step: only records with ``step`` at least this.
            kind: only ``step`` or only ``eval`` records.
            limit: records per page (at most 10,000).
        """
        params = {"after_seq": after_seq, "since_step": since_step, "kind": kind, "limit": limit}
        return self._get(f"/jobs/{job_id}/metrics", MetricsPage, params)

    def events(
        self,
        job_id: str,
        *,
        after_id: int | None = None,
        kind: str | None = None,
        limit: int = 1000,
    ) -> EventsPage:
        """A page of a job's events (state changes, faults, membership, checkpoints).

        Args:
            job_id: the job.
            after_id: only events newer than this ``id`` (the page's ``last_id`` reads on).
            kind: only events of this kind (``core.events.EventKind``).
            limit: events per page (at most 10,000).
        """
        params = {"after_id": after_id, "kind": kind, "limit": limit}
        return self._get(f"/jobs/{job_id}/events", EventsPage, params)

    def history(self, job_id: str, *, max_points: int = 2000, events: int = 200) -> HistoryPublic:
        """A job's charts in one request: its step and eval records (thinned to
        ``max_points`` each) and its latest ``events``; :meth:`stream` goes on from its
        ``last_seq`` and ``last_event_id``."""
        params = {"max_points": max_points, "events": events}
        return self._get(f"/jobs/{job_id}/history", HistoryPublic, params)

    def stream(
        self,
        job_id: str,
        *,
        after_seq: int = -1,
        after_id: int = 0,
        last_event_id: str | None = None,
        reconnects: int = STREAM_RECONNECTS,
    ) -> Iterator[StreamItem]:
        """Follow a job live: its state and progress, its new records and events, then its
        end (server-sent events of ``GET /jobs/{id}/stream``).

        The items come in the service's order; the iterator ends after a
        :class:`~elastic_sgd.streams.StreamEnd`. When the connection breaks off before the
        end (the network, a restarting service, or the service dropping a reader that fell
        behind), it reconnects with ``Last-Event-ID`` set to the last cursor received, so
        nothing is lost and nothing comes twice.

        Args:
            job_id: the job.
            after_seq: start after this metric ``seq`` (-1: from the first record).
            after_id: start after this event ``id`` (0: from the first event).
            last_event_id: a cursor (``MetricUpdate.cursor``, ``EventUpdate.cursor``) to
                resume from; wins over ``after_seq`` and ``after_id``.
            reconnects: times in a row the stream may break off before this gives up.

        Raises:
            NotFound: no job ``job_id``.
            TooManyRequests: the service follows as many streams as it allows.
            ServiceUnreachable: the stream broke off ``reconnects`` times in a row.
        """
        cursor = last_event_id
        failures = 0
        while True:
            headers = {} if cursor is None else {"Last-Event-ID": cursor}
            params = {"after_seq": after_seq, "after_id": after_id}
            try:
                for item in self._stream_once(job_id, params, headers):
                    failures = 0
                    if isinstance(item, MetricUpdate | EventUpdate):
                        cursor = item.cursor
                    yield item
                    if isinstance(item, StreamEnd):
                        return
                reason = "the stream ended before the job did"
            except httpx.TransportError as exc:
                reason = _reason(exc)
            failures += 1
            if failures > reconnects:
                raise ServiceUnreachable(
                    self.url, f"the stream of job {job_id} broke off {failures} times: {reason}"
                )
            time.sleep(STREAM_RETRY_S)

    def _stream_once(
        self, job_id: str, params: Mapping[str, Any], headers: Mapping[str, str]
    ) -> Iterator[StreamItem]:
        path = f"/jobs/{job_id}/stream"
        timeout = httpx.Timeout(self.timeout_s, read=self.stream_read_timeout_s)
        with self._http.stream(
            "GET", path, params=dict(params), headers=dict(headers), timeout=timeout
        ) as r:
            if r.status_code >= 400:
                raise error_of(r.status_code, r.read(), "GET", path)
            parser = SSEParser()
            for line in r.iter_lines():
                msg = parser.feed(line)
                if msg is None:
                    continue
                try:
                    items = items_of(msg)
                except (ValidationError, ValueError, KeyError, TypeError) as exc:
                    raise UnexpectedAnswer(
                        f"the stream of job {job_id} at {self.url} sent a {msg.event!r} message "
                        f"that is not what the API sends ({type(exc).__name__}): is this an "
                        "elastic-sgd service of this version?"
                    ) from exc
                yield from items

    def stream_metrics(self, job_id: str, *, after_seq: int = -1) -> Iterator[MetricPublic]:
        """The job's metric records as they come (see :meth:`stream`), until it ends."""
        for item in self.stream(job_id, after_seq=after_seq):
            if isinstance(item, MetricUpdate):
                yield item.metric

    def stream_events(self, job_id: str, *, after_id: int = 0) -> Iterator[EventPublic]:
        """The job's events as they come (see :meth:`stream`), until it ends."""
        for item in self.stream(job_id, after_id=after_id):
            if isinstance(item, EventUpdate):
                yield item.event

    # -- the model --------------------------------------------------------------------------

    def model_bytes(self, job_id: str) -> bytes:
        """The job's latest model of record, as ``torch.save`` wrote it: a dict with the
        model's ``state_dict``, the job's ``spec`` and the ``step`` it was taken at
        (``torch.load(io.BytesIO(data), weights_only=True)["state_dict"]`` are the weights).

        Raises:
            Conflict: the job has no model yet.
        """
        return self.request("GET", f"/jobs/{job_id}/model").content

    def download_model(self, job_id: str, path: str | PathLike[str]) -> Path:
        """Write the job's latest model of record (see :meth:`model_bytes`) to ``path``;
        returns the path."""
        out = Path(path)
        out.write_bytes(self.model_bytes(job_id))
        return out

    # -- drills -----------------------------------------------------------------------------

    def submit_drill(self, drill: DrillLike) -> DrillPublic:
        """Start a drill (a job with a fault plan and pass criteria).

        Args:
            drill: a :class:`~service.drills.spec.DrillSpec`, a mapping (``name``, ``job``,
                ``criteria``; the service validates it), or the path of a drill YAML file.

        Raises:
            SpecError: a drill file that cannot be read or is invalid (nothing was sent).
            ValidationFailed: the service refused fields of the drill.
        """
        return self._post("/drills", DrillPublic, _drill_body(drill))

    def get_drill(self, drill_id: str) -> DrillPublic:
        """A drill: its state (``running``, ``passed``, ``failed``, ``error``) and report."""
        return self._get(f"/drills/{drill_id}", DrillPublic)

    def drill_report(
        self, drill_id: str, *, timeout_s: float | None = None, interval_s: float = 1.0
    ) -> DrillReport:
        """Wait for the drill to end and return its report.

        Raises:
            TimeoutError: still running after ``timeout_s``.
            ServiceError: the drill ended without a report (its ``error`` says why).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        drill = self.get_drill(drill_id)
        while drill.state == "running":
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"drill {drill_id} still runs after {timeout_s:g} s")
            time.sleep(interval_s)
            drill = self.get_drill(drill_id)
        if drill.report is None:
            raise ServiceError(
                f"drill {drill_id} ended ({drill.state}) without a report: {drill.error}"
            )
        return drill.report

    def drill_plot(self, drill_id: str) -> bytes:
        """A finished drill's plot (PNG: loss, test accuracy and B̂ over time).

        Raises:
            Conflict: the drill still runs.
        """
        return self.request("GET", f"/drills/{drill_id}/plot.png").content

    # -- health -----------------------------------------------------------------------------

    def health(self) -> HealthPublic:
        """Liveness: the service's process answers."""
        return self._get("/healthz", HealthPublic)

    def ready(self) -> ReadyPublic:
        """Readiness: store, Ray and supervisor (a service that is not ready answers 503 with
        the same body: returned, not raised; ``status`` says which)."""
        try:
            r = self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise ServiceUnreachable(self.url, _reason(exc)) from exc
        if r.status_code not in (200, 503):
            raise error_of(r.status_code, r.content, "GET", "/readyz")
        return self._parse(r, ReadyPublic)


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _query(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Query parameters without the ``None`` ones (the service's defaults apply)."""
    return {k: v for k, v in (params or {}).items() if v is not None}


def _spec_body(spec: SpecLike) -> Any:
    if isinstance(spec, JobSpec):
        return spec.model_dump(mode="json")
    if isinstance(spec, str | PathLike):
        return load_spec(Path(spec)).model_dump(mode="json")
    return dict(spec)


def _drill_body(drill: DrillLike) -> Any:
    if isinstance(drill, DrillSpec):
        return drill.model_dump(mode="json")
    if isinstance(drill, str | PathLike):
        return parse_drill(_yaml_of(Path(drill))).model_dump(mode="json")
    return dict(drill)


def _yaml_of(path: Path) -> Any:
    """A YAML file's content.

    Raises:
        SpecError: the file cannot be read or is not YAML.
    """
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError([("file", f"cannot read {path}: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([("file", f"{path} is not valid YAML: {exc}")]) from None


__all__ = ["DEFAULT_URL", "Client", "DrillLike", "FaultLike", "SpecLike"]
