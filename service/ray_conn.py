"""The service's connection to Ray, and its view of the cluster's resources.

Two ways in, one namespace (``elastic-sgd``, where the job coordinators are named):

* no address: a local Ray instance started in-process (embedded default, no dashboard);
* ``ESGD_RAY_ADDRESS`` / ``RAY_ADDRESS``: an existing cluster (``ray start --head`` on
  this machine, a ``ray up`` cluster, a KubeRay ``RayCluster``).

Jobs keep running through a restart of the service only in the second case (they are
re-attached): a Ray instance started in-process ends with the process that started it, and
its jobs resume from their latest checkpoints when the service starts again.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from core.errors import ElasticSGDError

log = logging.getLogger(__name__)

NAMESPACE = "elastic-sgd"


class RayConnectionError(ElasticSGDError):
    """Ray could not be started or reached."""


def connect(address: str | None) -> str:
    """Connect this process to Ray (idempotent).

    Args:
        address: a cluster address, or None for a local instance started in-process.

    Returns:
        The GCS address of the cluster now connected.

    Raises:
        RayConnectionError: with the address tried and what to change.
    """
    import ray

    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    # Quiet Ray's own log deduplication/warnings on the driver; job logs go to the store.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            # An inherited RAY_ADDRESS would make ray.init() connect instead of start, and so
            # would a `ray start` cluster on this machine (ray.init() without an address joins
            # the one in /tmp/ray/ray_current_cluster): "local" always starts a new instance.
            os.environ.pop("RAY_ADDRESS", None)
            ray.init(
                address="local", include_dashboard=False, namespace=NAMESPACE, log_to_driver=False
            )
    except Exception as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise RayConnectionError(
            f"could not connect to {where}: {exc}. Check that the cluster is up "
            "(`ray status`) or unset ESGD_RAY_ADDRESS/RAY_ADDRESS to run Ray in-process"
        ) from exc
    gcs = str(ray.get_runtime_context().gcs_address)
    log.info("connected to Ray at %s (namespace %s)", gcs, NAMESPACE)
    return gcs


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def is_connected() -> bool:
    import ray

    return bool(ray.is_initialized())


class RayCluster:
    """Free resources, node capacities and autoscaler requests of the connected cluster."""

    def available(self) -> dict[str, float]:
        import ray

        return {str(k): float(v) for k, v in ray.available_resources().items()}

    def node_capacities(self) -> list[dict[str, float]]:
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
