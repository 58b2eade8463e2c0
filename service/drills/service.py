"""Drills over the service: ``POST /drills`` runs a drill's job like any other job.

:class:`DrillService` submits the drill's job through the :class:`~service.jobs.JobManager`
(so it shows up on the dashboard) and, when the job ends, reads the job's typed events and
records back from the :class:`~service.store.Store` and runs the same analysis, report and
plot as the local runner (:mod:`service.drills.analyse`, :mod:`service.drills.report`).
The report is stored with the drill (``GET /drills/{id}``) and written, with ``report.md``
and ``report.png``, into the job's folder (``GET /drills/{id}/plot.png``).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path

from core.errors import ElasticSGDError, InvalidTransition
from core.state import JobState
from service.drills.analyse import analyse_drill
from service.drills.report import REPORT_PNG, build_report, write_report_files
from service.drills.spec import DrillSpec
from service.jobs import JobManager
from service.store import DrillRow, JobRow, Store, new_id

log = logging.getLogger(__name__)


class DrillNotFound(ElasticSGDError):
    """No drill with that id is known to the service (or it has no such file yet)."""


class DrillState(StrEnum):
    RUNNING = "running"  # its job has not ended yet
    PASSED = "passed"  # every evaluated criterion held
    FAILED = "failed"  # at least one criterion did not hold
    ERROR = "error"  # the drill could not be run or evaluated (see ``error``)

    @property
    def terminal(self) -> bool:
        return self is not DrillState.RUNNING


class DrillService:
    """Runs drills as jobs and stores their reports.

    Args:
        jobs: the job manager (the drill's job is an ordinary job with a ``drill_id``).
        store: persistence.
    """

    def __init__(self, jobs: JobManager, store: Store) -> None:
        self.jobs = jobs
        self.store = store
        jobs.on_terminal.append(self._on_job_end)

    def submit(self, spec: DrillSpec) -> DrillRow:
        """Start a drill.

        Raises:
            SpecError: the drill's job cannot be accepted (e.g. its data file is missing).
        """
        self.jobs.check_data_path(spec.job)
        drill_id = new_id()
        self.store.create_drill(
            drill_id, spec.name, spec.model_dump(mode="json"), state=DrillState.RUNNING.value
        )
        job = self.jobs.submit(spec.job, drill_id=drill_id)
        self.store.update_drill(drill_id, job_id=job.id)
        return self.get(drill_id)

    def get(self, drill_id: str) -> DrillRow:
        """The drill.

        Raises:
            DrillNotFound: no drill has that id.
        """
        row = self.store.get_drill(drill_id)
        if row is None:
            raise DrillNotFound(f"no drill {drill_id!r}: start one with POST /drills")
        return row

    def plot_path(self, drill_id: str) -> Path:
        """The drill's plot (``report.png`` in its job's folder).

        Raises:
            DrillNotFound: no drill has that id, or it ended without a record to plot.
            InvalidTransition: the drill is still running (its plot is drawn at its end).
        """
        drill = self.get(drill_id)
        if not DrillState(drill.state).terminal:
            raise InvalidTransition(
                f"drill {drill_id!r} is {drill.state}: its plot is drawn when its job ends; "
                "wait for its report"
            )
        job = None if drill.job_id is None else self.store.get_job(drill.job_id)
        path = None if job is None else Path(job.out_dir) / REPORT_PNG
        if path is None or not path.is_file():
            raise DrillNotFound(f"drill {drill_id!r} has no plot: it is {drill.state}")
        return path

    def reconcile(self) -> None:
        """Evaluate drills whose job ended while the service was down."""
        for d in self.store.list_drills(states=[DrillState.RUNNING.value]):
            job = None if d.job_id is None else self.store.get_job(d.job_id)
            if job is None:
                self.store.update_drill(
                    d.id,
                    state=DrillState.ERROR.value,
                    error="the service stopped before the drill's job was "
                    "created; start the drill again",
                )
            elif JobState(job.state).terminal:
                self._on_job_end(job)

    def _on_job_end(self, job: JobRow) -> None:
        if job.drill_id is None:
            return
        drill = self.store.get_drill(job.drill_id)
        if drill is None or DrillState(drill.state).terminal:
            return
        try:
            spec = DrillSpec.model_validate(drill.spec)
            fresh = self.store.get_job(job.id) or job
            events = self.store.typed_events(job.id)
            records = self.store.typed_records(job.id)
            analysis = analyse_drill(spec, job.state, fresh.summary, events, records)
            report = build_report(spec, analysis, job.state, fresh.summary)
            report["job_id"] = job.id
            write_report_files(Path(job.out_dir), report, analysis, records)
        except Exception as exc:
            log.exception("drill %s: evaluation failed", drill.id)
            self.store.update_drill(
                drill.id, state=DrillState.ERROR.value, error=f"evaluation failed: {exc!r}"
            )
            return
        state = DrillState.PASSED if report["passed"] else DrillState.FAILED
        self.store.update_drill(drill.id, state=state.value, report=report)
        log.info("drill %s (%s): %s", drill.id, drill.name, state)
