"""One vocabulary for where a job (and its coordinator) is in its life."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a job is in its life; the coordinator uses the members from ``starting`` on."""

    PENDING = "pending"  # accepted; waiting for the cluster to have its resources
    STARTING = "starting"  # coordinator and workers are being created
    RUNNING = "running"  # training
    RECOVERING = "recovering"  # a fault is being handled (membership change, restart)
    SUCCEEDED = "succeeded"  # all steps done; outputs written
    FAILED = "failed"  # stopped by an error; ``error`` says why and what to change
    CANCELLED = "cancelled"  # stopped on request

    @property
    def terminal(self) -> bool:
        """No transition leaves a terminal state."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def live(self) -> bool:
        """The job has (or is getting) actors in Ray."""
        return self in (JobState.STARTING, JobState.RUNNING, JobState.RECOVERING)

    @property
    def accepts_changes(self) -> bool:
        """Scale and fault injection are possible (the coordinator is up)."""
        return self in (JobState.RUNNING, JobState.RECOVERING)
