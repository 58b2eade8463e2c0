"""ASGI middleware: the request body size limit (413 before the app sees the body), and
per-request timing (a ``Server-Timing`` header and a Prometheus histogram)."""

from __future__ import annotations

import json
import time

from prometheus_client import CollectorRegistry, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Upper bounds (s) of the request-duration buckets: the API targets p99 < 100 ms.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class RequestTiming:
    """Time every HTTP request from its arrival to the start of its response.

    * ``Server-Timing: app;dur=<ms>`` on every response (browsers' developer tools show it;
      ``bench.load`` uses it to split a latency into server time and the rest);
    * ``esgd_http_request_duration_seconds{method, route, status}`` in ``registry`` (served
      by ``GET /metrics``), labelled by the route's template (``/jobs/{job_id}``), not the
      raw path, so that the label set stays small.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.histogram = Histogram(
            "esgd_http_request_duration_seconds",
            "Time from a request's arrival to the start of its response",
            ["method", "route", "status"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                dur = time.perf_counter() - t0
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"app;dur={1000.0 * dur:.2f}".encode()))
                message = {**message, "headers": headers}
                route = scope.get("route")
                self.histogram.labels(
                    scope.get("method", ""),
                    getattr(route, "path", None) or "unmatched",
                    str(message["status"]),
                ).observe(dur)
            await send(message)

        await self.app(scope, receive, timed_send)


class BodySizeLimit:
    """Refuse request bodies over ``max_body_bytes`` with 413 and a JSON message.

    The body is read (at most ``max_body_bytes`` + one chunk) before the app runs and then
    replayed, so the limit also holds for chunked bodies without a Content-Length.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._declared_too_big(scope):
            await self._refuse(send)
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)  # no body expected: keep streaming receive
            return
        body, too_big = await self._read_body(receive)
        if too_big:
            await self._refuse(send)
            return
        if body is None:  # the client went away
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _declared_too_big(self, scope: Scope) -> bool:
        """Whether a Content-Length of the request (a number) is over the limit."""
        for name, value in scope.get("headers", []):
            if name != b"content-length":
                continue
            try:
                if int(value) > self.max_body_bytes:
                    return True
            except ValueError:
                continue
        return False

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, bool]:
        """``(body, too_big)``: the whole body, read until it ends or passes the limit
        (``None`` if the client went away first)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    async def _refuse(self, send: Send) -> None:
        payload = json.dumps(
            {
                "detail": f"request body too large: the limit is {self.max_body_bytes} bytes "
                "(ESGD_MAX_BODY_BYTES on the server); send a smaller spec",
                "errors": [],
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
