"""Fault-injection drills run locally, and the report each one leaves behind.

A drill (:class:`~service.drill_jobs.DrillSpec`, a file in ``configs/drills/``) is a job with
a fault plan and the criteria it must meet. :func:`run_drill` runs the job to its end with
:func:`~service.local_run.run_local` (no service: local Ray, or ``RAY_ADDRESS``), checks it
with :func:`~service.drill_jobs.evaluate_drill` (the same verdict the service gives), and
writes three files next to the run's own (``metrics.jsonl``, ``summary.json``, ``model.pt``):

* ``report.json``: the verdict, every check, an excerpt of the summary, every event, each
  planned fault matched to the events it produced, and the recovery numbers;
* ``report.md``: the same for a reader (verdict, checks, faults, recovery, steps lost after
  the last checkpoint, a timeline of fault / detect / membership / restart events);
* ``report.png``: training loss, test accuracy and B̂ (with its bound) over the job's time,
  every fault event drawn as a labelled vertical line.

Recovery is measured from the run's own records, so it covers every worker death (injected,
killed from outside, or its node lost), not only the ones the runtime planned:

* a worker: from the fault that took it out (an injected crash or partition, or one
  reported from outside; its ``detect`` event when nothing is known) to its detection and
  to the first step record applied after the detection;
* the coordinator: from its ``fault`` event to the first step record after it (training
  resumed), with the steps redone since the last checkpoint.

:func:`write_report` does the evaluation and the writing for a run that someone else drove
(a test that kills a worker from outside, a multi-node cluster), so every drill reports the
same way.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import yaml

from actors.faults import resolve_targets
from core.errors import ElasticSGDError, SpecError
from core.spec import FaultSpec, JobSpec
from service.drill_jobs import DrillSpec, evaluate_drill, parse_drill
from service.local_run import run_local

# Event kinds the timeline shows (state changes and checkpoints are in report.json).
TIMELINE_KINDS = ("fault", "detect", "membership", "restart")
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
    "refused_stale",
    "restarts",
    "steps_lost",
    "recoveries",
    "recovery_s",
    "consistency",
    "timing",
)
# A detect event for a dropped gradient (the worker stays in the membership).
_DROP_DETECT = re.compile(r"^step \d+: gradient missing")
# Fault events that can take a worker out of the membership (a crash, a partition; planned
# or injected through the runtime call).
_LOSS_FAULTS = (
    "crash injected",
    "partition:",
    "injected crash",
    "injected partition",
    "external:",
)
# What each fault kind's event detail starts with (actors/coordinator.py).
_FAULT_DETAIL = {
    "crash": "crash injected",
    "drop": "gradient of step",
    "partition": "partition: worker cut off",
    "coordinator_crash": "coordinator crash injected",
    "delay": "straggler delay",
}


def load_drill(path: str | Path) -> DrillSpec:
    """Read a drill file (YAML: ``name``, ``job``, ``criteria``).

    Raises:
        SpecError: the file is missing, is not YAML, or holds an invalid drill (the field
            paths look like ``job.faults.0.at_step``).
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise SpecError([("file", f"cannot read {p}: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([("file", f"{p} is not valid YAML: {exc}")]) from None
    return parse_drill(data)


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
    for name in ("summary.json", "report.json", "report.md", "report.png"):
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
    external: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a finished drill run and write ``report.{json,md,png}`` into ``out_dir``.

    Args:
        drill: the drill whose job ran.
        out_dir: the run's folder (``metrics.jsonl`` is read from it if present).
        summary: the run's summary (``None`` if the job ended without one).
        error: why the run did not end normally, if it did not.
        external: faults caused from outside the service, each ``{"wall_time", "target",
            "detail"}`` (e.g. a worker SIGKILLed by hand, its node removed). They join the
            timeline, the plot and the recovery numbers as ``fault`` events whose detail
            starts with ``external:``; the criteria are evaluated without them.
        extra: more fields for report.json.

    Returns:
        The report.
    """
    out_dir = Path(out_dir)
    s: dict[str, Any] = dict(summary or {})
    events: list[dict[str, Any]] = [dict(e) for e in s.get("events") or []]
    records = read_records(out_dir)
    job_state = str(s.get("state") or "failed")
    verdict = evaluate_drill(drill, job_state, s or None, [str(e["kind"]) for e in events])
    coverage = fault_coverage(drill.job, events, s)
    events = _with_external(events, records, external)
    workers = worker_recoveries(events, records)
    coordinator = coordinator_recoveries(events, records)
    report: dict[str, Any] = {
        "drill": drill.name,
        "passed": bool(verdict["passed"]) and error is None,
        "job_state": job_state,
        "error": error or s.get("error"),
        "checks": verdict["checks"],
        "not_evaluated": verdict["not_evaluated"],
        "summary": {k: s.get(k) for k in SUMMARY_FIELDS if k in s},
        "faults": coverage,
        "recoveries": {
            "workers": workers,
            "coordinator": coordinator,
            "runtime": s.get("recoveries") or [],
        },
        "steps_lost": s.get("steps_lost"),
        # first to last record: the summary's wall_seconds restarts with a restarted
        # coordinator
        "train_time_s": _train_time_s(records),
        "events": events,
        "spec": drill.model_dump(mode="json"),
    }
    if extra:
        report.update(extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plotted = plot_run(records, events, out_dir / "report.png", title=f"drill {drill.name}")
    (out_dir / "report.md").write_text(
        render_markdown(report, plot="report.png" if plotted else None)
    )
    return report


def read_records(out_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` records in the order they were produced ([] if none)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line
            continue
    return sorted(out, key=lambda r: (float(r.get("wall_time", 0.0)), int(r.get("seq", 0))))


def _with_external(
    events: list[dict[str, Any]],
    records: Sequence[Mapping[str, Any]],
    external: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """``events`` with the external faults merged in, in wall-time order."""
    if not external:
        return events
    # the job's clock: time_s = wall_time - t0, the same for every event and record
    ref = next((e for e in [*events, *records] if "wall_time" in e and "time_s" in e), None)
    t0 = float(ref["wall_time"]) - float(ref["time_s"]) if ref is not None else 0.0
    added = []
    for x in external:
        wall = float(x["wall_time"])
        before = [r for r in records if r.get("kind") == "step" and _wall(r) <= wall]
        added.append(
            {
                "seq": None,
                "wall_time": wall,
                "time_s": wall - t0,
                "step": before[-1].get("step") if before else 0,
                "kind": "fault",
                "target": x.get("target"),
                "detail": f"external: {x.get('detail', '')}",
                "source": "external",
            }
        )
    return sorted([*events, *added], key=_wall)


def _train_time_s(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Seconds from the first metrics record (the initial evaluation) to the last one."""
    times = [float(r["time_s"]) for r in records if "time_s" in r]
    return _round(max(times) - min(times)) if times else None


def _wall(e: Mapping[str, Any]) -> float:
    return float(e.get("wall_time", 0.0))


def _first_step_after(records: Sequence[Mapping[str, Any]], wall: float) -> dict[str, Any] | None:
    """The first step record applied strictly after ``wall``."""
    for r in records:
        if r.get("kind") == "step" and _wall(r) > wall:
            return dict(r)
    return None


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def worker_recoveries(
    events: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Every worker that left the membership because it was lost, and how fast the job
    went on without it.

    Returns:
        One entry per lost worker (a dropped gradient is not a loss): its ``cause`` (the
        injected fault event before the detection, or ``"not injected"``: killed from
        outside, node lost), ``detect_after_s`` from that fault, ``next_update_after_s``
        from the fault (or from the detection when nothing was injected), and
        ``replacement_joined_after_s`` when a new incarnation joined before the end.
    """
    out = []
    for i, d in enumerate(events):
        if d.get("kind") != "detect" or _DROP_DETECT.match(str(d.get("detail", ""))):
            continue
        target = d.get("target")
        t_detect = _wall(d)
        fault = None
        for e in reversed(events[:i]):
            if e.get("target") != target:
                continue
            if e.get("kind") == "detect":  # an earlier loss of the same worker id
                break
            detail = str(e.get("detail", ""))
            if e.get("kind") == "fault" and detail.startswith(_LOSS_FAULTS):
                fault = e
                break
        t0 = _wall(fault) if fault is not None else t_detect
        nxt = _first_step_after(records, t_detect)
        started = joined = None
        for e in events[i + 1 :]:
            if e.get("target") != target or e.get("kind") != "membership":
                continue
            detail = str(e.get("detail", ""))
            if started is None and detail.startswith("starting a worker"):
                started = e
            if detail.startswith("worker joined"):
                joined = e
                break
        out.append(
            {
                "worker": target,
                "cause": str(fault["detail"]) if fault is not None else "not injected",
                "detected": str(d.get("detail", "")),
                "fault_time_s": _round(float(fault["time_s"])) if fault is not None else None,
                "detect_time_s": _round(float(d.get("time_s", 0.0))),
                "detect_after_s": _round(t_detect - t0) if fault is not None else None,
                "next_update_step": None if nxt is None else nxt.get("step"),
                "next_update_after_s": None if nxt is None else _round(_wall(nxt) - t0),
                "next_update_after_detect_s": None
                if nxt is None
                else _round(_wall(nxt) - t_detect),
                "replacement_started": started is not None,
                "replacement_joined_after_s": None
                if joined is None
                else _round(_wall(joined) - t0),
            }
        )
    return out


def coordinator_recoveries(
    events: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Every coordinator crash: how long until training resumed, and the steps redone.

    ``resume_after_s`` runs from the crash's fault event to the first step record after it
    (the restarted coordinator's first applied update); ``steps_lost`` is the crash's step
    minus the last step the restarted coordinator had (its checkpoint), i.e. the steps done
    again.
    """
    out = []
    for i, f in enumerate(events):
        if f.get("kind") != "fault" or f.get("target") != "coordinator":
            continue
        t_fault = _wall(f)
        restart = next(
            (e for e in events[i + 1 :] if e.get("kind") == "restart" and _wall(e) >= t_fault),
            None,
        )
        nxt = _first_step_after(records, t_fault)
        crash_step = int(f.get("step") or 0)
        resumed_step = None if nxt is None else int(nxt.get("step") or 0)
        out.append(
            {
                "crash_step": crash_step,
                "fault_time_s": _round(float(f.get("time_s", 0.0))),
                "restart": None if restart is None else str(restart.get("detail", "")),
                "restarted_after_s": None if restart is None else _round(_wall(restart) - t_fault),
                "resumed_step": resumed_step,
                "resume_after_s": None if nxt is None else _round(_wall(nxt) - t_fault),
                # the first step after the restart is checkpoint + 1
                "steps_lost": None
                if resumed_step is None
                else max(crash_step - (resumed_step - 1), 0),
            }
        )
    return out


def _trigger(f: FaultSpec) -> str:
    parts = []
    if f.at_step is not None:
        parts.append(f"at step {f.at_step}")
    if f.at_s is not None:
        parts.append(f"at {f.at_s:g} s")
    if f.probability is not None:
        parts.append(f"p={f.probability:g} per step")
    if f.steps is not None:
        parts.append(f"steps {f.steps}")
    if f.duration_s is not None:
        parts.append(f"for {f.duration_s:g} s")
    if f.duration_steps is not None:
        parts.append(f"for {f.duration_steps} steps")
    if f.rejoin_after_s is not None:
        parts.append(f"rejoin after {f.rejoin_after_s:g} s")
    if f.kind == "delay":
        parts.append(f"{f.distribution} {f.delay_ms:g} ms")
    return ", ".join(parts) or "whole run"


def fault_coverage(
    spec: JobSpec, events: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Each planned fault matched to the ``fault`` events it produced.

    A fault is ``required`` to show up unless it fires with a per-step probability (which
    may, in a short run, never happen). A fault with several targets counts as recorded
    when every target that ever joined the job has an event (a probabilistic drop: when
    any has). For ``delay``
    faults the note adds the mean injected delay per gradient from the summary's timing.
    """
    ids = list(range(spec.workers))
    timing = summary.get("timing") or {}
    # a worker id that never joined (e.g. one a resize would have added) cannot be hit
    joined = {
        str(e.get("target"))
        for e in events
        if e.get("kind") == "membership"
        and str(e.get("detail", "")).startswith(("worker joined", "worker re-attached"))
    }
    out = []
    for index, f in enumerate(spec.faults):
        if f.kind == "coordinator_crash":
            targets = ["coordinator"]
        else:
            targets = [f"worker-{w}" for w in resolve_targets(f, ids, spec.seed, index)]
        prefix = _FAULT_DETAIL[f.kind]
        hits = [
            e
            for e in events
            if e.get("kind") == "fault"
            and e.get("target") in targets
            and str(e.get("detail", "")).startswith(prefix)
        ]
        seen = sorted({str(e.get("target")) for e in hits})
        reachable = [t for t in targets if t == "coordinator" or t in joined]
        note = ""
        if f.kind == "delay":
            note = f"mean injected delay {float(timing.get('delay_ms', 0.0)):.1f} ms per gradient"
        out.append(
            {
                "index": index,
                "kind": f.kind,
                "targets": targets,
                "trigger": _trigger(f),
                "events": len(hits),
                "targets_seen": seen,
                "first_event_time_s": _round(float(hits[0]["time_s"])) if hits else None,
                "recorded": bool(hits)
                and (
                    (f.kind == "drop" and f.probability is not None) or set(seen) >= set(reachable)
                ),
                "required": f.probability is None,
                "note": note,
            }
        )
    return out


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


def render_markdown(report: Mapping[str, Any], plot: str | None = "report.png") -> str:
    """The report for a reader (what report.md holds)."""
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
        f"{_cell(s.get('final_test_accuracy'), '.4f')}; B̂ max "
        f"{_cell(cons.get('b_hat_max'))} (bound {_cell(cons.get('bound'))})."
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
    faults = report.get("faults") or []
    lines += ["", "## Planned faults", ""]
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
    outside = [e for e in report.get("events") or [] if e.get("source") == "external"]
    for e in outside:
        lines += [
            "",
            f"From outside the service at {float(e['time_s']):.2f} s (step {e['step']}): "
            f"{e['target']}: {_short(e['detail'])}",
        ]
    rec = report.get("recoveries") or {}
    lines += ["", "## Recovery", ""]
    workers = rec.get("workers") or []
    if workers:
        lines += [
            "Seconds from the worker's fault (its detection when nothing was injected) to "
            "its detection, to the next applied update, and to a replacement joining.",
            "",
        ]
        lines += _table(
            [
                "worker",
                "cause",
                "detected as",
                "fault at (s)",
                "detected after (s)",
                "next update after (s)",
                "replacement joined after (s)",
            ],
            [
                [
                    w["worker"],
                    w["cause"],
                    _short(w["detected"]),
                    _secs(w["fault_time_s"]),
                    _secs(w["detect_after_s"], 3),
                    _secs(w["next_update_after_s"], 3),
                    _secs(w["replacement_joined_after_s"])
                    if w["replacement_joined_after_s"] is not None
                    else ("started" if w["replacement_started"] else "-"),
                ]
                for w in workers
            ],
        )
    else:
        lines.append("No worker was lost.")
    coords = rec.get("coordinator") or []
    if coords:
        lines += ["", "Coordinator crashes (training resumed = first update after the crash):", ""]
        lines += _table(
            [
                "crash step",
                "restarted after (s)",
                "training resumed after (s)",
                "resumed at step",
                "steps lost",
            ],
            [
                [
                    c["crash_step"],
                    _secs(c["restarted_after_s"]),
                    _secs(c["resume_after_s"]),
                    c["resumed_step"],
                    c["steps_lost"],
                ]
                for c in coords
            ],
        )
    lines += [
        "",
        f"**Steps lost (after the last checkpoint): {_cell(report.get('steps_lost'))}**",
        "",
        f"Dropped gradients: {_cell(s.get('dropped_gradients'))}; coordinator restarts: "
        f"{_cell(s.get('restarts'))}.",
    ]
    events = [e for e in report.get("events") or [] if e.get("kind") in TIMELINE_KINDS]
    lines += ["", "## Timeline", ""]
    if events:
        shown = events[:TIMELINE_MAX_ROWS]
        lines += _table(
            ["time (s)", "step", "kind", "target", "detail"],
            [
                [
                    f"{float(e.get('time_s', 0.0)):.2f}",
                    e.get("step"),
                    e.get("kind"),
                    e.get("target"),
                    _short(e.get("detail")),
                ]
                for e in shown
            ],
        )
        if len(events) > len(shown):
            lines += [
                "",
                f"... and {len(events) - len(shown)} more events (report.json has them all).",
            ]
    else:
        lines.append("No fault, detect, membership or restart events.")
    if plot:
        lines += ["", "## Loss, accuracy and B̂ over time", "", f"![loss, accuracy and B̂]({plot})"]
    return "\n".join(lines) + "\n"


# -- plot ------------------------------------------------------------------------------------


def _fault_kind(e: Mapping[str, Any]) -> str:
    """What a fault event's line is called in the plot (``crash``, ``drop``, ...)."""
    detail = str(e.get("detail", ""))
    if e.get("target") == "coordinator":
        return "coordinator crash"
    for prefix, name in (
        ("external", "external"),
        ("crash injected", "crash"),
        ("gradient of step", "drop"),
        ("partition healed", "healed"),
        ("partition", "partition"),
        ("straggler delay", "delay"),
        ("injected", "injected"),
    ):
        if detail.startswith(prefix):
            return name
    return detail.split(":")[0][:24]


def _fault_labels(faults: Sequence[Mapping[str, Any]]) -> list[tuple[float, str, str]]:
    """Where to write which label: ``(time_s, kind, text)``.

    Events of one kind less than 0.1 s apart share a label listing their targets
    (``delay worker-0, worker-1``); a kind with many events (every dropped gradient) gets
    one label with its count, at its first event.
    """
    out: list[tuple[float, str, str]] = []
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for e in faults:
        by_kind.setdefault(_fault_kind(e), []).append(e)
    for kind, evs in by_kind.items():
        if len(evs) > 8:
            out.append((float(evs[0].get("time_s", 0.0)), kind, f"{kind} x{len(evs)}"))
            continue
        groups: list[list[Mapping[str, Any]]] = []
        for e in evs:
            t = float(e.get("time_s", 0.0))
            if groups and t - float(groups[-1][0].get("time_s", 0.0)) <= 0.1:
                groups[-1].append(e)
            else:
                groups.append([e])
        for group in groups:
            targets = ", ".join(dict.fromkeys(str(g["target"]) for g in group if g.get("target")))
            text = kind if kind == "coordinator crash" else f"{kind} {targets}".strip()
            out.append((float(group[0].get("time_s", 0.0)), kind, text))
    return sorted(out)


def plot_run(
    records: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    title: str = "",
) -> bool:
    """Training loss, test accuracy and B̂ (with its bound) over time, faults marked.

    Every ``fault`` event is a vertical line in all three panels; each distinct label
    (``crash worker-1``, ``drop``, ...) is written once, at its first line, and counted.

    Returns:
        False (and no file) when there are no records to plot.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("test_accuracy") is not None]
    if not steps and not evals:
        return False
    fig = Figure(figsize=(10, 8), layout="constrained")
    ax_loss, ax_acc, ax_b = fig.subplots(3, 1, sharex=True)
    t = [float(r["time_s"]) for r in steps if r.get("loss") is not None]
    ax_loss.plot(t, [float(r["loss"]) for r in steps if r.get("loss") is not None], lw=0.8)
    ax_loss.set_ylabel("training loss")
    ax_acc.plot(
        [float(r["time_s"]) for r in evals],
        [float(r["test_accuracy"]) for r in evals],
        marker="o",
        ms=3,
        color="tab:green",
    )
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(0.0, 1.02)
    ax_acc.axhline(0.95, color="tab:green", ls=":", lw=0.8)
    ts = [float(r["time_s"]) for r in steps]
    ax_b.plot(ts, [float(r.get("b_hat") or 0.0) for r in steps], lw=0.8, label="B̂ (last view)")
    ax_b.plot(ts, [float(r.get("b_hat_max") or 0.0) for r in steps], lw=1.0, label="B̂ max")
    bound = [(float(r["time_s"]), float(r["bound"])) for r in steps if r.get("bound") is not None]
    if bound:
        ax_b.plot(*zip(*bound, strict=True), color="black", ls="--", lw=1.0, label="bound")
    ax_b.set_ylabel("B̂ (gradient units)")
    ax_b.set_xlabel("time since the job started (s)")
    ax_b.legend(loc="upper left", fontsize=8)
    faults = [e for e in events if e.get("kind") == "fault"]
    kinds = sorted({_fault_kind(e) for e in faults})
    colours = ["tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive"]
    colour = {k: colours[i % len(colours)] for i, k in enumerate(kinds)}
    many = len(faults) > 40  # e.g. every dropped gradient: thinner, fainter lines
    for e in faults:
        x = float(e.get("time_s", 0.0))
        for ax in (ax_loss, ax_acc, ax_b):
            ax.axvline(
                x,
                color=colour[_fault_kind(e)],
                lw=0.4 if many else 1.0,
                alpha=0.35 if many else 0.8,
            )
    for n, (x, kind, text) in enumerate(_fault_labels(faults)):
        ax_loss.annotate(
            text,
            xy=(x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2 - 10 * (n % 12)),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color=colour[kind],
        )
    fig.suptitle(title or "drill")
    fig.savefig(path, dpi=100)
    return True
