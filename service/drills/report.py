"""A drill's report: the analysis as JSON (``report.json``) and for a reader (``report.md``).

:func:`build_report` turns a :class:`~service.drills.analyse.DrillAnalysis` into the report
mapping both paths store (the local runner in ``report.json``, the service in its database
and in the job's folder); :func:`render_markdown` writes it for a reader: the verdict, every
check, the planned faults, the recoveries, the steps lost after the last checkpoint, and a
timeline of fault / detect / membership / restart events. :func:`write_report_files` writes
``report.json``, ``report.png`` (:mod:`service.drills.plot`) and ``report.md``.

The markdown reads the report mapping (so a stored report renders the same), and shows
``detail`` sentences as they are: they are for people, and no verdict depends on them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.events import EventKind, Record
from service.drills.analyse import DrillAnalysis
from service.drills.plot import plot_run
from service.drills.spec import DrillSpec

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
REPORT_FILES = (REPORT_JSON, REPORT_MD, REPORT_PNG)
# Event kinds the timeline shows (state changes and checkpoints are in report.json).
TIMELINE_KINDS = frozenset(
    {
        EventKind.FAULT,
        EventKind.INJECT,
        EventKind.HEAL,
        EventKind.DETECT,
        EventKind.MEMBERSHIP,
        EventKind.RESTART,
    }
)
# Longest timeline in report.md; report.json keeps every event.
TIMELINE_MAX_ROWS = 80
# Summary fields copied into report.json (the whole summary is in summary.json).
SUMMARY_FIELDS = (
    "state",
    "error",
    "steps",
    "total_steps",
    "final_test_accuracy",
    "final_test_loss",
    "wall_seconds",
    "samples_per_s",
    "mode",
    "workers",
    "workers_final",
    "dropped_gradients",
    "steps_all_lost",
    "refused_stale",
    "gradients_corrupted",
    "gradients_refused_nonfinite",
    "restarts",
    "steps_lost",
    "recoveries",
    "recovery_s",
    "consistency",
    "timing",
)


def build_report(
    drill: DrillSpec,
    analysis: DrillAnalysis,
    job_state: str,
    summary: Mapping[str, Any] | None,
    *,
    error: str | None = None,
) -> dict[str, Any]:
    """The report mapping (what ``report.json`` holds).

    Args:
        drill: the drill.
        analysis: its analysis.
        job_state: the job's terminal state.
        summary: the job's summary (None if it wrote none).
        error: why the run did not end normally; a drill with an error has failed.

    Returns:
        ``passed``, ``checks``, ``not_evaluated``, ``faults`` (coverage), ``recoveries``,
        ``events`` (each with ``source``: ``runner`` or ``external``) and an excerpt of the
        summary, among others.
    """
    s = dict(summary or {})
    external = set(analysis.external)
    return {
        "drill": drill.name,
        "passed": analysis.passed and error is None,
        "job_state": job_state,
        "error": error or s.get("error"),
        "checks": [c.to_dict() for c in analysis.checks],
        "not_evaluated": analysis.not_evaluated,
        "summary": {k: s.get(k) for k in SUMMARY_FIELDS if k in s},
        "faults": [c.to_dict() for c in analysis.coverage],
        "recoveries": {
            "workers": [w.to_dict() for w in analysis.workers],
            "coordinator": [c.to_dict() for c in analysis.coordinator],
            "runtime": s.get("recoveries") or [],
        },
        "restarts": analysis.restarts,
        "steps_lost": s.get("steps_lost"),
        # first to last record: the summary's wall_seconds restarts with a restarted
        # coordinator
        "train_time_s": analysis.train_time_s,
        "events": [
            {**e.to_dict(), "source": "external" if e in external else "runner"}
            for e in analysis.events
        ],
        "spec": drill.model_dump(mode="json"),
    }


def write_report_files(
    out_dir: Path, report: Mapping[str, Any], analysis: DrillAnalysis, records: Sequence[Record]
) -> bool:
    """Write ``report.json``, ``report.png`` and ``report.md`` into ``out_dir``.

    Returns:
        Whether there was anything to plot (no ``report.png`` otherwise).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    plotted = plot_run(
        records, analysis.events, out_dir / REPORT_PNG, title=f"drill {report.get('drill')}"
    )
    if not plotted:
        (out_dir / REPORT_PNG).unlink(missing_ok=True)
    (out_dir / REPORT_MD).write_text(render_markdown(report, plot=REPORT_PNG if plotted else None))
    return plotted


# -- markdown ---------------------------------------------------------------------------------
def _cell(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if math.isnan(v) else format(v, spec)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _secs(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _short(text: Any, limit: int = 140) -> str:
    """The first line of an event's detail, cut to ``limit`` characters."""
    first = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _head(report: Mapping[str, Any]) -> list[str]:
    s = report.get("summary") or {}
    cons = s.get("consistency") or {}
    verdict = "PASSED" if report.get("passed") else "FAILED"
    lines = [f"# Drill `{report.get('drill')}`: {verdict}", ""]
    lines.append(
        f"Job ended **{report.get('job_state')}**: {_cell(s.get('steps'))}/"
        f"{_cell(s.get('total_steps'))} steps in {_cell(report.get('train_time_s'), '.1f')} s "
        "of training, "
        f"mode {_cell(s.get('mode'))}, {_cell(s.get('workers'))} workers at the start and "
        f"{_cell(s.get('workers_final'))} at the end; final test accuracy "
        f"{_cell(s.get('final_test_accuracy'), '.4f')}; B̂ mean "
        f"{_cell(cons.get('b_hat_mean'))}, max {_cell(cons.get('b_hat_max'))} against the "
        f"bound {_cell(cons.get('bound'))} frozen at step {_cell(cons.get('frozen_at_step'))} "
        f"after a {_cell(cons.get('warmup_steps'))}-step warm-up; guard verdict "
        f"{_cell(cons.get('verdict'))}."
    )
    if report.get("error"):
        lines += ["", f"**Error:** {report['error']}"]
    lines += ["", "## Checks", ""]
    res = {True: "pass", False: "**FAIL**", None: "n/a"}
    lines += _table(
        ["check", "result", "observed", "expected", "note"],
        [
            [c["name"], res[c["passed"]], c.get("observed"), c.get("expected"), c.get("detail")]
            for c in report.get("checks") or []
        ],
    )
    return lines


def _faults(report: Mapping[str, Any]) -> list[str]:
    faults = report.get("faults") or []
    lines = ["", "## Planned faults", ""]
    if faults:
        lines += _table(
            ["#", "kind", "targets", "trigger", "fault events", "recorded", "note"],
            [
                [
                    f["index"],
                    f["kind"],
                    ", ".join(f["targets"]),
                    f["trigger"],
                    f["events"],
                    f["recorded"],
                    f["note"],
                ]
                for f in faults
            ],
        )
    else:
        lines.append("None in the job spec (faults may have been caused from outside).")
    for e in report.get("events") or []:
        if e.get("source") == "external":
            lines += [
                "",
                f"From outside the service at {float(e['time_s']):.2f} s (step {e['step']}): "
                f"{e['target']}: {_short(e['detail'])}",
            ]
    return lines


def _worker_rows(workers: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    return [
        [
            w["worker"],
            w["fault"] or "not injected",
            _short(w["cause"]),
            _short(w["detected"]),
            _secs(w["fault_time_s"]),
            _secs(w["detect_after_s"], 3),
            _secs(w["next_update_after_s"], 3),
            _secs(w["replacement_joined_after_s"])
            if w["replacement_joined_after_s"] is not None
            else ("started" if w["replacement_started"] else "-"),
        ]
        for w in workers
    ]


def _recovery(report: Mapping[str, Any]) -> list[str]:
    rec = report.get("recoveries") or {}
    lines = ["", "## Recovery", ""]
    workers = rec.get("workers") or []
    if workers:
        lines += [
            "Seconds from the worker's fault (its detection when nothing is known) to "
            "its detection, to the next applied update, and to a replacement joining.",
            "",
        ]
        header = ["worker", "fault", "cause", "detected as", "fault at (s)"]
        header += ["detected after (s)", "next update after (s)", "replacement joined after (s)"]
        lines += _table(header, _worker_rows(workers))
    else:
        lines.append("No worker was lost.")
    coords = rec.get("coordinator") or []
    if coords:
        lines += ["", "Coordinator crashes (training resumed = first update after the crash):", ""]
        lines += _table(
            [
                "injected",
                "crash step",
                "restarted after (s)",
                "training resumed after (s)",
                "resumed at step",
                "steps lost",
            ],
            [
                [
                    c["injected"],
                    c["crash_step"],
                    _secs(c["restarted_after_s"]),
                    _secs(c["resume_after_s"]),
                    c["resumed_step"],
                    c["steps_lost"],
                ]
                for c in coords
            ],
        )
    s = report.get("summary") or {}
    lines += [
        "",
        f"**Steps lost (after the last checkpoint): {_cell(report.get('steps_lost'))}**",
        "",
        f"Dropped gradients: {_cell(s.get('dropped_gradients'))} (steps with every "
        f"gradient lost: {_cell(s.get('steps_all_lost'))}); coordinator restarts: "
        f"{_cell(report.get('restarts'))}.",
    ]
    return lines


def _timeline(report: Mapping[str, Any]) -> list[str]:
    events = [e for e in report.get("events") or [] if e.get("kind") in TIMELINE_KINDS]
    lines = ["", "## Timeline", ""]
    if not events:
        return [*lines, "No fault, detect, membership or restart events."]
    shown = events[:TIMELINE_MAX_ROWS]
    lines += _table(
        ["time (s)", "step", "kind", "fault", "target", "detail"],
        [
            [
                f"{float(e.get('time_s', 0.0)):.2f}",
                e.get("step"),
                e.get("kind"),
                e.get("fault"),
                e.get("target"),
                _short(e.get("detail")),
            ]
            for e in shown
        ],
    )
    if len(events) > len(shown):
        lines += ["", f"... and {len(events) - len(shown)} more events (report.json has them all)."]
    return lines


def render_markdown(report: Mapping[str, Any], plot: str | None = REPORT_PNG) -> str:
    """The report for a reader (what report.md holds)."""
    lines = [*_head(report), *_faults(report), *_recovery(report), *_timeline(report)]
    if plot:
        lines += ["", "## Loss, accuracy and B̂ over time", "", f"![loss, accuracy and B̂]({plot})"]
    return "\n".join(lines) + "\n"
