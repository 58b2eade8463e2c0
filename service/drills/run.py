"""Drills run locally: ``elastic-sgd drill FILE --out DIR``.

:func:`run_drill` runs a drill's job to its end with :func:`~service.local_run.run_local`
(no service: local Ray, or ``RAY_ADDRESS``) and reports it with :func:`write_report`, which
reads the run's typed events (the summary's ``events``) and records (``metrics.jsonl``),
analyses them with :func:`~service.drills.analyse.analyse_drill` (the same analysis the
service runs for ``POST /drills``) and writes ``report.json``, ``report.md`` and
``report.png`` next to the run's own files (``metrics.jsonl``, ``summary.json``,
``model.pt``).

:func:`write_report` also serves runs someone else drove (a test that kills a worker from
outside, a multi-node cluster), so every drill reports the same way.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from core.errors import ElasticSGDError
from core.events import Event, Record, record_from_dict
from core.state import JobState
from service.drills.analyse import ExternalFault, analyse_drill
from service.drills.report import REPORT_FILES, build_report, write_report_files
from service.drills.spec import DrillSpec
from service.local_run import run_local

METRICS_FILE = "metrics.jsonl"


def run_drill(
    drill: DrillSpec,
    out_dir: Path,
    *,
    data_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run a drill's job to its end on local Ray and write its report into ``out_dir``.

    A job that cannot start or whose coordinator does not come back is a failed drill
    (with the error in the report), not an exception.

    Args:
        drill: the drill.
        out_dir: where the run's files and ``report.{json,md,png}`` go (created; the files
            of an earlier run there are replaced).
        data_dir: where ``npz`` datasets are looked up.
        progress: show a progress bar and the events on stderr.

    Returns:
        The report (also in ``report.json``); ``report["passed"]`` is the verdict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", *REPORT_FILES):
        (out_dir / name).unlink(missing_ok=True)
    job_id = f"drill-{drill.name}-{uuid.uuid4().hex[:8]}"
    summary: dict[str, Any] | None
    error: str | None = None
    try:
        summary = run_local(drill.job, out_dir, data_dir=data_dir, progress=progress, job_id=job_id)
    except (ElasticSGDError, ray.exceptions.RayError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        summary = None
    return write_report(drill, out_dir, summary, error=error)


def write_report(
    drill: DrillSpec,
    out_dir: Path,
    summary: Mapping[str, Any] | None,
    *,
    error: str | None = None,
    external: Sequence[ExternalFault] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Analyse a finished drill run and write ``report.{json,md,png}`` into ``out_dir``.

    Args:
        drill: the drill whose job ran.
        out_dir: the run's folder (its ``metrics.jsonl`` is read if present).
        summary: the run's summary (``None`` if the job ended without one); its ``events``
            are the run's events.
        error: why the run did not end normally, if it did not.
        external: faults caused from outside the service (a worker SIGKILLed by hand, its
            node removed); they join the timeline, the plot and the recovery numbers.
        extra: more fields for report.json.

    Returns:
        The report.
    """
    out_dir = Path(out_dir)
    s = dict(summary or {})
    events = [Event.from_dict(e) for e in s.get("events") or []]
    records = read_records(out_dir)
    job_state = str(s.get("state") or JobState.FAILED.value)
    analysis = analyse_drill(drill, job_state, s, events, records, external=external)
    report = build_report(drill, analysis, job_state, s, error=error)
    report.update(extra or {})
    write_report_files(out_dir, report, analysis, records)
    return report


def read_records(out_dir: Path) -> list[Record]:
    """The run's ``metrics.jsonl`` records in the order they were produced ([] if none)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(record_from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # a torn last line
            continue
    return sorted(out, key=lambda r: (r.wall_time, r.seq))
