"""The one way this project connects a process to Ray, and its view of the cluster's resources.

The service (``api.main``), the job runner behind ``elastic-sgd run`` (:mod:`service.runner`),
the benchmarks and the test fixtures all connect through :func:`connect`, in namespace
:data:`core.names.NAMESPACE` (where the job coordinators are named). One rule decides where:

* **an address** (``elastic-sgd serve --ray-address``, else ``ESGD_RAY_ADDRESS``, else
  ``RAY_ADDRESS``): connect to that cluster (``host:port`` of a ``ray start --head``, a
  ``ray up`` or KubeRay cluster; ``auto`` for the one started on this machine;
  ``ray://...`` for Ray Client);
* **no address** (both unset, or the first one set is empty): start a new Ray instance
  embedded in this process (no dashboard). It never silently joins a ``ray start`` cluster
  that happens to run on this machine, which a bare ``ray.init()`` would.

:func:`address_from_env` reads the two variables the same way the service's settings do
(the first one *set* wins, so ``ESGD_RAY_ADDRESS=`` forces an embedded Ray even when
``RAY_ADDRESS`` is set for something else).

Jobs keep running through a restart of the service only on a cluster (they are
re-attached): a Ray instance embedded in a process ends with it, and its jobs resume from
their latest checkpoints when the service starts again.

**Ray lost, process stays.** Left to itself, a Ray driver whose GCS stops answering ends
its own process after ``RAY_gcs_rpc_server_reconnect_timeout_s`` (60 s by default: the
service would exit). :func:`connect` raises that timeout to a day, so the process decides:
the supervisor probes the GCS (:func:`gcs_reachable`, a TCP connect to its port) and, when
it is gone, :func:`reconnect` starts a new embedded instance (or waits, with backoff, for a
cluster's GCS to answer again) and the jobs resume from their checkpoints
(:meth:`service.jobs.JobManager.tick`).

**One thread owns the embedded instance.** Ray starts its GCS, raylet and agents with
``PR_SET_PDEATHSIG`` (Linux kernel fate-sharing): they are killed when the *thread* that
started them ends, not only the process. The service connects from worker threads (the
start-up's ``run_in_threadpool``, the supervisor), and anyio ends a pool thread that sat
idle for 10 s when the next request comes in: the embedded Ray died with it, taking every
job down ("Ray is lost" and a restart of every job, seen after a burst of requests and a
pause). :func:`connect` therefore calls ``ray.init`` on :data:`owner thread
<_OWNER>`, a thread of this module's that lives as long as the process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any

from core.errors import ElasticSGDError
from core.names import NAMESPACE
from service.ray_errors import describe

log = logging.getLogger(__name__)

# the variables that name a cluster, in the order they are consulted
ADDRESS_VARIABLES = ("ESGD_RAY_ADDRESS", "RAY_ADDRESS")
# Ray's own limit on a lost GCS before it ends the process (and its raylet and workers):
# a day, so that losing the GCS is this service's decision, not an exit (see above).
GCS_RECONNECT_TIMEOUT_S = 86_400
# ray.shutdown() of a driver whose GCS is dead took 7 s here; past this it is abandoned.
SHUTDOWN_TIMEOUT_S = 30.0
# A GCS probe: one TCP connect, at most this long.
PROBE_TIMEOUT_S = 1.0
# The thread every ray.init of this process runs on (see the module's docstring): an
# executor's thread never ends while the process runs (unlike anyio's pool threads).
_OWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esgd-ray-owner")


class RayConnectionError(ElasticSGDError):
    """Ray could not be started or reached."""


def address_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray address the environment names, or ``None`` for an embedded instance.

    Args:
        environ: the variables to read (default: ``os.environ``).

    Returns:
        The value of the first of ``ESGD_RAY_ADDRESS``, ``RAY_ADDRESS`` that is set, or
        ``None`` if neither is set or that value is empty.
    """
    env = os.environ if environ is None else environ
    for name in ADDRESS_VARIABLES:
        if name in env:
            return env[name].strip() or None
    return None


def connect(
    address: str | None,
    *,
    num_cpus: int | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> str:
    """Connect this process to Ray (idempotent: an existing connection is kept as it is).

    Args:
        address: a cluster address; ``None`` or empty starts an embedded instance.
        num_cpus: logical CPUs of an embedded instance (default: the machine's cores).
        runtime_env: the job-level ``runtime_env`` of every actor this process creates
            (and, by inheritance, of the actors they create): how user tasks' packages
            reach the workers (``py_modules``/``working_dir`` directories are uploaded
            once, here; Ray takes local directories only at this level). Ignored when
            already connected.

    Returns:
        The GCS address of the Ray instance now connected.

    Raises:
        RayConnectionError: with the address tried and what to change; also when
            ``num_cpus`` is given with an address (a cluster's size is its own).
    """
    import ray  # here, not at the top: the API and the CLI load without Ray

    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    if address and num_cpus is not None:
        raise RayConnectionError(
            f"num_cpus={num_cpus} sizes an embedded Ray instance, but address {address!r} "
            "names a cluster: drop one of them"
        )
    # Ray's log deduplication on the driver is off: job logs go to the store.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(GCS_RECONNECT_TIMEOUT_S))
    try:
        # on the owner thread: an embedded Ray's processes end with the thread that started them
        _OWNER.submit(_init, address or None, num_cpus, runtime_env).result()
    except Exception as exc:
        where = f"the Ray cluster at {address!r}" if address else "an embedded Ray instance"
        raise RayConnectionError(
            f"could not connect to {where}: {describe(exc)}. Check that the "
            "cluster is up (`ray status`), or unset ESGD_RAY_ADDRESS/RAY_ADDRESS to run Ray "
            "in-process"
        ) from exc
    gcs = str(ray.get_runtime_context().gcs_address)
    log.info("connected to Ray at %s (namespace %s)", gcs, NAMESPACE)
    return gcs


def _init(address: str | None, num_cpus: int | None, runtime_env: dict[str, Any] | None) -> None:
    import ray

    common: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False}
    if runtime_env:
        common["runtime_env"] = runtime_env
    if address is not None:
        ray.init(address=address, **common)
        return
    # "local" starts a new instance whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster
    # say; dropping the variable keeps the processes this one starts off the other cluster.
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, **common)


def ensure_connected(runtime_env: dict[str, Any] | None = None) -> str:
    """:func:`connect` to where the environment says (:func:`address_from_env`), with
    ``runtime_env`` if this connects.

    Returns:
        The GCS address of the Ray instance now connected.

    Raises:
        RayConnectionError: as :func:`connect`.
    """
    return connect(address_from_env(), runtime_env=runtime_env)


def disconnect() -> None:
    """Leave Ray (an embedded instance stops; a cluster's detached actors run on)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


class GcsProbe(StrEnum):
    """What one probe of the GCS found."""

    UP = "up"  # it accepted a connection
    REFUSED = "refused"  # nothing listens (a dead GCS on a live host), or not connected
    NO_ANSWER = "no_answer"  # no answer in time: a busy GCS, or a host that is gone


def gcs_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> GcsProbe:
    """Whether the connected Ray instance's GCS accepts a TCP connection now.

    A refused connection is definite: the GCS's port is closed. A connection that does not
    complete within ``timeout_s`` is not: a GCS too busy to accept looks the same as a host
    that went away. A probe costs one connect, and never blocks on Ray's own retries.
    """
    import ray

    if not ray.is_initialized():
        return GcsProbe.REFUSED
    try:
        host, _, port = str(ray.get_runtime_context().gcs_address).rpartition(":")
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return GcsProbe.UP
    except TimeoutError:
        return GcsProbe.NO_ANSWER
    except (OSError, ValueError) as exc:
        log.info("the GCS probe failed: %r", exc)
        return GcsProbe.REFUSED


def reconnect(address: str | None, *, backoff_s: tuple[float, float] = (1.0, 30.0)) -> str:
    """Drop a connection whose GCS is gone and connect again.

    Embedded (``address`` empty): the old instance is shut down (what is left of it: its
    raylet, and with it the job's actors) and a new one starts. A cluster: connect again
    once its GCS answers, retrying with exponential backoff from ``backoff_s[0]`` to
    ``backoff_s[1]`` seconds between tries (a cluster's GCS may come back: GCS fault
    tolerance, a restarted head).

    Returns:
        The GCS address of the new connection.
    """
    import ray

    done = threading.Event()

    def shut() -> None:
        try:
            ray.shutdown()
        except Exception:
            log.exception("ray.shutdown() of the lost instance failed")
        done.set()

    threading.Thread(target=shut, name="esgd-ray-shutdown", daemon=True).start()
    if not done.wait(SHUTDOWN_TIMEOUT_S):
        log.warning("ray.shutdown() still runs after %.0f s; connecting anyway", SHUTDOWN_TIMEOUT_S)
    wait_s = backoff_s[0]
    while True:
        try:
            return connect(address)
        except RayConnectionError as exc:
            if not address:
                raise  # an embedded instance that cannot start: nothing to wait for
            log.warning("Ray at %s: %s; trying again in %.0f s", address, exc, wait_s)
            time.sleep(wait_s)
            wait_s = min(2 * wait_s, backoff_s[1])


def is_connected() -> bool:
    """Whether this process is connected to a Ray instance."""
    import ray

    return bool(ray.is_initialized())


class RayCluster:
    """Free resources, node capacities and autoscaler requests of the connected cluster."""

    def available(self) -> dict[str, float]:
        """Resources not held by any actor or task now, summed over the alive nodes."""
        import ray

        free: dict[str, Any] = ray.available_resources()
        return {str(k): float(v) for k, v in free.items()}

    def node_capacities(self) -> list[dict[str, float]]:
        """Total resources of each alive node (what one job's bundle can fit in)."""
        import ray

        nodes: list[dict[str, Any]] = ray.nodes()
        return [
            {str(k): float(v) for k, v in n.get("Resources", {}).items()}
            for n in nodes
            if n.get("Alive")
        ]

    def request(self, bundles: list[dict[str, float]]) -> None:
        """Ask the autoscaler to make room for ``bundles`` (replaces the previous request;
        an empty list withdraws it). Harmless on a cluster without an autoscaler."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
