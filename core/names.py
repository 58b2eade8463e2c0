"""Names of the Ray objects a job owns: one place, so cancel and the reaper find them all."""

from __future__ import annotations

# every actor of the service (coordinators, workers) lives in this Ray namespace
NAMESPACE = "elastic-sgd"


def coordinator_name(job_id: str) -> str:
    """The coordinator actor of ``job_id``."""
    return f"esgd-{job_id}"


def worker_prefix(job_id: str) -> str:
    """What every worker actor name of ``job_id`` starts with."""
    return f"esgd-{job_id}-w"


def worker_name(job_id: str, worker: int, gen: int) -> str:
    """Worker ``worker``'s incarnation ``gen`` (a replacement gets ``gen + 1``)."""
    return f"{worker_prefix(job_id)}{worker}-g{gen}"


def job_of_actor(name: str) -> str | None:
    """The job id an actor name belongs to (``None``: not one of ours)."""
    if not name.startswith("esgd-"):
        return None
    rest = name.removeprefix("esgd-")
    head, sep, tail = rest.rpartition("-w")
    if sep and "-g" in tail:
        return head
    return rest
