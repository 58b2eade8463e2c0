"""The service's event loop, watched.

Every request, stream write and store read the service does waits its turn on one asyncio
loop. A timer set for ``interval_s`` that fires late was queued behind other work of the
loop (a long callback, a blocking call, a pause of the whole process), and every request
that arrived meanwhile waited as long: its latency includes time no ``Server-Timing`` can
see (that header starts when the request's handler does). :class:`LoopWatch` measures that
lateness on a timer every 50 ms, into ``esgd_event_loop_lag_seconds`` (a histogram in the
app's HTTP registry, served by ``GET /metrics``), so a slow tail can be told apart: a
loop that fired on time while a client saw 70 ms means the time was spent outside the
service's loop (the network stack, the client's own scheduling).
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry, Histogram

# seconds between two timers: often enough to see a 25 ms stall, ~20 wake-ups a second
INTERVAL_S = 0.05
# upper bounds (s) of the lag buckets: the API's latency targets are 50 and 100 ms
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LoopWatch:
    """A background task on the running loop that records how late its timer fires.

    Args:
        registry: where ``esgd_event_loop_lag_seconds`` is registered.
        interval_s: the timer's period.
    """

    def __init__(self, registry: CollectorRegistry, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.histogram = Histogram(
            "esgd_event_loop_lag_seconds",
            "How late a timer of the service's event loop fired (one every 50 ms): how long "
            "anything queued on the loop then waited behind its other work",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching the running loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="esgd-loop-watch")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - t - self.interval_s)
            self.histogram.observe(lag)

    async def stop(self) -> None:
        """Stop watching (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
