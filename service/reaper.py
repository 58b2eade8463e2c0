"""The reaper's decision: which actors of the service's namespace belong to no live job.

Every actor a job starts is named after it (:mod:`core.names`), so an actor left behind (a
coordinator that outlived a forced cancel, a worker created while its job was being
killed, a detached worker of a job whose service died) can be told from the live ones by
name alone. The job manager lists the namespace's named actors *before* it reads which
jobs are live, so an actor of a job that is just starting is never taken for an orphan (a
job is live before it creates actors), and kills what :func:`orphans` returns, with a
``reap`` event on the job. Only jobs of its own store are reaped: several services may share
one Ray cluster (and its namespace), and an actor of a job this service never knew belongs
to another one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from core.names import job_of_actor


def orphans(
    names: Iterable[str], live_jobs: Collection[str], known_jobs: Collection[str]
) -> dict[str, list[str]]:
    """The actor names to reap, by the job they belong to.

    Args:
        names: named actors in the service's namespace.
        live_jobs: ids of the jobs that may hold actors (not terminal).
        known_jobs: ids of every job this service's store holds.

    Returns:
        ``{job id: [actor names]}`` for every actor of a job this service knows and that is
        not live; names that are not a job's, and jobs of other services, are left alone.
    """
    out: dict[str, list[str]] = {}
    for name in names:
        job = job_of_actor(name)
        if job is not None and job in known_jobs and job not in live_jobs:
            out.setdefault(job, []).append(name)
    return {job: sorted(group) for job, group in sorted(out.items())}
