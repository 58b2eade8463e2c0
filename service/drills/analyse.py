"""A finished drill analysed from its typed events and records (pure: no Ray, no files).

:func:`analyse_drill` is the one place a drill's verdict comes from, for the local runner
(:mod:`service.drills.run`) and for drills run through the service
(:mod:`service.drills.service`) alike. It reads the run's :class:`~core.events.Event` list,
its :class:`~core.events.StepRecord` / :class:`~core.events.EvalRecord` list and its summary,
and only typed fields of the events: ``kind`` (an :class:`~core.events.EventKind`),
``fault`` (a :class:`~core.events.FaultKind`), ``target`` / ``worker``, ``step`` and
``wall_time``. ``detail`` is for people: it is copied into the report, never matched, so a
reworded message cannot change a verdict.

What it finds:

* coverage: each planned fault matched to the ``FAULT`` events of its kind on its targets.
  Every fault kind is covered the same way, so a kind added later needs nothing here;
* worker recoveries: every ``DETECT`` (a worker found lost), timed from the fault that took
  it out (the last crash, partition or outside kill on that worker since its previous loss;
  its detection when there is none, e.g. a SIGKILL nobody reported) to its detection, to the
  first step applied after the detection, and to a replacement joining;
* coordinator recoveries: every injected coordinator crash and every ``RESTART``, with the
  time until training resumed and the steps done again;
* the checks: one :class:`Check` per criterion of the drill. A check whose data the run did
  not provide is ``passed=None`` ("not evaluated", with the reason in ``detail``) and does
  not fail the drill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from actors.faults import resolve_targets
from core.events import (
    COORDINATOR_TARGET,
    Event,
    EventKind,
    FaultKind,
    Record,
    StepRecord,
    worker_target,
)
from core.spec import FaultSpec, JobSpec
from core.state import JobState
from service.drills.spec import DrillSpec

# Faults that take a worker out of the membership: the cause of a later DETECT on it.
LOSS_FAULTS = frozenset({FaultKind.CRASH, FaultKind.PARTITION, FaultKind.EXTERNAL})
# The ``seq`` of an event that did not come from the run (a fault caused from outside).
EXTERNAL_SEQ = -1
# Relative slack on ``b_hat_mean <= bound``: both are sums of float32 norms.
BOUND_RTOL = 1e-9


@dataclass(frozen=True)
class ExternalFault:
    """A fault caused from outside the service (a worker SIGKILLed by hand, its node lost).

    Args:
        wall_time: Unix time it happened.
        target: ``worker-<id>`` (or another event target).
        detail: what was done, for people.
    """

    wall_time: float
    target: str
    detail: str


@dataclass(frozen=True)
class Check:
    """One criterion checked: ``passed`` is None when the run gave no data for it."""

    name: str
    passed: bool | None
    observed: Any
    expected: Any
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FaultCoverage:
    """One planned fault and the ``FAULT`` events it produced."""

    index: int  # position in the job's ``faults``
    kind: str
    targets: list[str]
    trigger: str  # for people: "at step 100, rejoin after 0.5 s"
    events: int
    targets_seen: list[str]
    first_event_time_s: float | None
    recorded: bool  # it fired on every target it could reach (a probabilistic one: on any)
    required: bool  # a per-step probability may never fire in a short run: not required
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WorkerRecovery:
    """One worker found lost, and how fast the job went on without it (seconds)."""

    worker: str
    fault: str | None  # the FaultKind that took it out; None: nothing known (its DETECT)
    cause: str  # the fault event's detail, or "not injected"
    detected: str  # the detection's detail
    fault_time_s: float | None
    detect_time_s: float
    detect_after_s: float | None
    next_update_step: int | None
    next_update_after_s: float | None  # from the fault (the detection when none is known)
    next_update_after_detect_s: float | None
    replacement_started: bool
    replacement_joined_after_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CoordinatorRecovery:
    """One coordinator crash (injected, or a restart nobody injected) and its recovery."""

    injected: bool
    crash_step: int | None
    fault_time_s: float | None
    restart: str | None  # the restart event's detail
    restarted_after_s: float | None
    resumed_step: int | None  # the first step applied after the crash
    resume_after_s: float | None
    steps_lost: int | None  # steps done again: the crash's step minus the checkpoint's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DrillAnalysis:
    """Everything :func:`analyse_drill` found; ``passed`` is the drill's verdict."""

    passed: bool
    checks: list[Check]
    coverage: list[FaultCoverage]
    workers: list[WorkerRecovery]
    coordinator: list[CoordinatorRecovery]
    restarts: int  # RESTART events
    events: list[Event]  # the run's events and the external faults, in wall-time order
    external: list[Event] = field(default_factory=list)  # the external faults, as events
    train_time_s: float | None = None  # first to last record

    @property
    def not_evaluated(self) -> list[str]:
        return [c.name for c in self.checks if c.passed is None]


def analyse_drill(
    drill: DrillSpec,
    job_state: str,
    summary: Mapping[str, Any] | None,
    events: Sequence[Event],
    records: Sequence[Record],
    *,
    external: Sequence[ExternalFault] = (),
) -> DrillAnalysis:
    """Analyse a finished drill run (pure).

    Args:
        drill: the drill whose job ran.
        job_state: the job's terminal state (a :class:`~core.state.JobState` value).
        summary: the job's summary (None if it wrote none).
        events: the run's events, in the order they happened.
        records: the run's step and eval records.
        external: faults caused from outside; they join the events (as ``FAULT`` events of
            kind ``external``) and the recovery numbers; the criteria do not count them.

    Returns:
        The analysis; ``passed`` holds when every evaluated check passed.
    """
    s = dict(summary or {})
    recs = sorted(records, key=lambda r: (r.wall_time, r.seq))
    added = external_events(external, events, recs)
    evs = sorted([*events, *added], key=lambda e: e.wall_time)
    coverage = fault_coverage(drill.job, events, s)
    checks = evaluate_criteria(drill, job_state, s, coverage)
    return DrillAnalysis(
        passed=all(c.passed for c in checks if c.passed is not None),
        checks=checks,
        coverage=coverage,
        workers=worker_recoveries(evs, recs, s),
        coordinator=coordinator_recoveries(evs, recs),
        restarts=sum(1 for e in evs if e.kind is EventKind.RESTART),
        events=evs,
        external=added,
        train_time_s=_train_time_s(recs),
    )


# -- external faults ---------------------------------------------------------------------


def external_events(
    external: Sequence[ExternalFault], events: Sequence[Event], records: Sequence[Record]
) -> list[Event]:
    """The external faults as ``FAULT`` events of kind ``external`` on the job's clock."""
    if not external:
        return []
    # the job's clock: time_s = wall_time - t0, the same for every event and record
    ref = next(iter([*events, *records]), None)
    t0 = ref.wall_time - ref.time_s if ref is not None else 0.0
    out = []
    for x in external:
        before = [
            r.step for r in records if isinstance(r, StepRecord) and r.wall_time <= x.wall_time
        ]
        out.append(
            Event(
                seq=EXTERNAL_SEQ,
                wall_time=x.wall_time,
                time_s=x.wall_time - t0,
                step=before[-1] if before else 0,
                kind=EventKind.FAULT,
                detail=x.detail,
                target=x.target,
                fault=FaultKind.EXTERNAL,
            )
        )
    return out


# -- coverage ----------------------------------------------------------------------------


def trigger_text(f: FaultSpec) -> str:
    """A planned fault's trigger and window, for people (``at step 100, for 5 steps``)."""
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


def fault_targets(spec: JobSpec, index: int) -> list[str]:
    """The event targets planned fault ``index`` hits (as the runtime resolves them)."""
    f = spec.faults[index]
    if f.kind == FaultKind.COORDINATOR_CRASH.value:
        return [COORDINATOR_TARGET]
    ids = list(range(spec.workers))
    return [worker_target(w) for w in resolve_targets(f, ids, spec.seed, index)]


def fault_coverage(
    spec: JobSpec, events: Sequence[Event], summary: Mapping[str, Any]
) -> list[FaultCoverage]:
    """Each planned fault matched to the ``FAULT`` events of its kind on its targets.

    A fault is ``required`` unless it fires with a per-step probability (which may, in a
    short run, never happen). It is ``recorded`` when every target it could reach has an
    event (a probabilistic one: when any has). A worker that never had a membership event
    (never started, e.g. an id a resize would have added) cannot be reached.
    """
    reachable_workers = {
        e.target for e in events if e.kind is EventKind.MEMBERSHIP and e.worker is not None
    }
    timing = summary.get("timing")
    delay_ms = timing.get("delay_ms") if isinstance(timing, Mapping) else None
    out = []
    for index, f in enumerate(spec.faults):
        targets = fault_targets(spec, index)
        hits = [
            e
            for e in events
            if e.kind is EventKind.FAULT
            and e.fault is not None
            and e.fault.value == f.kind
            and e.target in targets
        ]
        seen = sorted({str(e.target) for e in hits})
        reachable = {t for t in targets if t == COORDINATOR_TARGET or t in reachable_workers}
        probabilistic = f.probability is not None
        note = ""
        if f.kind == FaultKind.DELAY.value and isinstance(delay_ms, int | float):
            note = f"mean injected delay {float(delay_ms):.1f} ms per gradient"
        out.append(
            FaultCoverage(
                index=index,
                kind=f.kind,
                targets=targets,
                trigger=trigger_text(f),
                events=len(hits),
                targets_seen=seen,
                first_event_time_s=_round(hits[0].time_s) if hits else None,
                recorded=bool(hits) and (probabilistic or set(seen) >= reachable),
                required=not probabilistic,
                note=note,
            )
        )
    return out


# -- recoveries --------------------------------------------------------------------------


def _first_step_after(records: Sequence[Record], wall: float) -> StepRecord | None:
    """The first step record applied strictly after ``wall``."""
    return next((r for r in records if isinstance(r, StepRecord) and r.wall_time > wall), None)


def _loss_cause(events: Sequence[Event], i: int) -> Event | None:
    """The fault that took out the worker of ``events[i]`` (a DETECT), if one is known."""
    target = events[i].target
    for e in reversed(events[:i]):
        if e.target != target:
            continue
        if e.kind is EventKind.DETECT:  # an earlier loss of the same worker id
            return None
        if e.kind is EventKind.FAULT and e.fault in LOSS_FAULTS:
            return e
    return None


def _replacement_started(events: Sequence[Event], i: int) -> bool:
    """A membership event about the worker of ``events[i]`` after its loss (a new one)."""
    target = events[i].target
    for e in events[i + 1 :]:
        if e.target != target:
            continue
        if e.kind is EventKind.DETECT:
            return False
        if e.kind is EventKind.MEMBERSHIP:
            return True
    return False


def _runtime_rejoins(summary: Mapping[str, Any]) -> dict[int, list[float | None]]:
    """The runtime's ``rejoined_after_s`` per worker id, one per loss, in order."""
    out: dict[int, list[float | None]] = {}
    runtime = summary.get("recoveries")
    for r in runtime if isinstance(runtime, list) else []:
        if isinstance(r, Mapping) and isinstance(r.get("worker"), int):
            out.setdefault(int(r["worker"]), []).append(_float(r.get("rejoined_after_s")))
    return out


def _joined_after_s(
    rejoins: dict[int, list[float | None]], detect: Event, fault: Event | None
) -> float | None:
    """Seconds from the loss's start to its replacement joining (the runtime's next entry
    for the worker, consumed); None when no replacement joined."""
    queue = rejoins.get(detect.worker) if detect.worker is not None else None
    if not queue:
        return None
    after_s = queue.pop(0)
    if after_s is None:
        return None
    # the runtime times a crash from its firing, any other loss from its detection
    crash = fault is not None and fault.fault is FaultKind.CRASH
    base = fault.wall_time if fault is not None and crash else detect.wall_time
    t0 = fault.wall_time if fault is not None else detect.wall_time
    return _round(base + after_s - t0)


def worker_recoveries(
    events: Sequence[Event], records: Sequence[Record], summary: Mapping[str, Any]
) -> list[WorkerRecovery]:
    """Every worker found lost (a ``DETECT`` event), and how fast the job went on.

    A dropped gradient is a ``MISSING`` event, not a loss. The replacement's join time is
    the runtime's own measure (the summary's ``recoveries``, one per loss of a worker id, in
    order), taken from the crash for an injected crash and from the detection otherwise.
    """
    rejoins = _runtime_rejoins(summary)
    out = []
    for i, d in enumerate(events):
        if d.kind is not EventKind.DETECT:
            continue
        fault = _loss_cause(events, i)
        t0 = fault.wall_time if fault is not None else d.wall_time
        nxt = _first_step_after(records, d.wall_time)
        joined_after_s = _joined_after_s(rejoins, d, fault)
        out.append(
            WorkerRecovery(
                worker=str(d.target),
                fault=None if fault is None or fault.fault is None else fault.fault.value,
                cause=fault.detail if fault is not None else "not injected",
                detected=d.detail,
                fault_time_s=_round(fault.time_s) if fault is not None else None,
                detect_time_s=round(d.time_s, 3),
                detect_after_s=_round(d.wall_time - t0) if fault is not None else None,
                next_update_step=None if nxt is None else nxt.step,
                next_update_after_s=None if nxt is None else _round(nxt.wall_time - t0),
                next_update_after_detect_s=None
                if nxt is None
                else _round(nxt.wall_time - d.wall_time),
                replacement_started=_replacement_started(events, i),
                replacement_joined_after_s=joined_after_s,
            )
        )
    return out


def _coordinator_recovery(
    start: Event, injected: bool, restart: Event | None, records: Sequence[Record]
) -> CoordinatorRecovery:
    nxt = _first_step_after(records, start.wall_time)
    crash_step = start.step if injected else None
    resumed = None if nxt is None else nxt.step
    # the first step after the restart is checkpoint + 1
    lost = None if resumed is None or crash_step is None else max(crash_step - (resumed - 1), 0)
    return CoordinatorRecovery(
        injected=injected,
        crash_step=crash_step,
        fault_time_s=_round(start.time_s) if injected else None,
        restart=None if restart is None else restart.detail,
        restarted_after_s=None if restart is None else _round(restart.wall_time - start.wall_time),
        resumed_step=resumed,
        resume_after_s=None if nxt is None else _round(nxt.wall_time - start.wall_time),
        steps_lost=lost,
    )


def coordinator_recoveries(
    events: Sequence[Event], records: Sequence[Record]
) -> list[CoordinatorRecovery]:
    """Every coordinator crash: how long until training resumed, and the steps redone.

    An injected crash (a ``FAULT`` of kind ``coordinator_crash``) is matched to the first
    ``RESTART`` after it; a ``RESTART`` no crash claimed (the process died of something
    else) is timed from itself. ``resume_after_s`` runs to the first step record after the
    crash; ``steps_lost`` is the crash's step minus the checkpoint the restart resumed from.
    """
    out = []
    claimed: set[int] = set()
    for i, e in enumerate(events):
        if e.kind is EventKind.FAULT and e.fault is FaultKind.COORDINATOR_CRASH:
            j = next(
                (j for j in range(i + 1, len(events)) if events[j].kind is EventKind.RESTART),
                None,
            )
            if j is not None:
                claimed.add(j)
            out.append(_coordinator_recovery(e, True, None if j is None else events[j], records))
        elif e.kind is EventKind.RESTART and i not in claimed:
            out.append(_coordinator_recovery(e, False, e, records))
    return out


# -- the checks --------------------------------------------------------------------------


def _float(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _train_time_s(records: Sequence[Record]) -> float | None:
    """Seconds from the first record (the initial evaluation) to the last one."""
    times = [r.time_s for r in records]
    return _round(max(times) - min(times)) if times else None


def check_accuracy(minimum: float, s: Mapping[str, Any]) -> Check:
    acc = _float(s.get("final_test_accuracy"))
    why = "" if acc is not None else "no final_test_accuracy in the summary"
    return Check(
        "min_test_accuracy", None if acc is None else acc >= minimum, acc, f">= {minimum}", why
    )


def check_bound(s: Mapping[str, Any]) -> Check:
    """Mean B̂ within the bound frozen after the warm-up, and the guard's verdict
    ``within`` (the paper's condition is on an expectation; the max is reported beside)."""
    cons = s.get("consistency")
    cons = cons if isinstance(cons, Mapping) else {}
    b_hat, bound = _float(cons.get("b_hat_mean")), _float(cons.get("bound"))
    verdict = cons.get("verdict")
    ok = (
        None
        if b_hat is None or bound is None
        else b_hat <= bound * (1 + BOUND_RTOL) and verdict == "within"
    )
    why = "" if ok is not None else "no consistency.b_hat_mean/bound in the summary"
    want = f"<= frozen bound {bound}, verdict within (was {verdict}; max {cons.get('b_hat_max')})"
    return Check("b_hat_within_bound", ok, b_hat, want, why)


def check_recovery(limit_s: float, s: Mapping[str, Any]) -> Check:
    rec = s.get("recovery_s")
    worst = max((float(x) for x in rec), default=0.0) if isinstance(rec, list) else _float(rec)
    why = "" if worst is not None else "the summary has no recovery_s"
    return Check(
        "max_recovery_s", None if worst is None else worst <= limit_s, worst, f"<= {limit_s}", why
    )


def check_steps_lost(limit: int, s: Mapping[str, Any]) -> Check:
    lost = s.get("steps_lost")
    n = lost if isinstance(lost, int) and not isinstance(lost, bool) else None
    why = "" if n is not None else "the summary has no steps_lost"
    return Check("max_steps_lost", None if n is None else n <= limit, n, f"<= {limit}", why)


def check_detect(limit_s: float, s: Mapping[str, Any]) -> Check:
    recs = s.get("recoveries")
    det = [
        x
        for r in (recs if isinstance(recs, list) else [])
        if isinstance(r, Mapping) and (x := _float(r.get("detected_after_s"))) is not None
    ]
    worst = max(det) if det else None
    why = "" if det else "the summary has no recoveries with detected_after_s"
    return Check(
        "max_detect_s", None if worst is None else worst <= limit_s, worst, f"<= {limit_s}", why
    )


def check_coverage(coverage: Sequence[FaultCoverage]) -> Check:
    required = [c for c in coverage if c.required]
    missed = [f"#{c.index} {c.kind} on {', '.join(c.targets)}" for c in required if not c.recorded]
    why = f"no fault event for {'; '.join(missed)}" if missed else ""
    expected = f"{len(required)} of {len(required)} required faults"
    return Check("faults_recorded", not missed, len(required) - len(missed), expected, why)


def check_corrupt_refused(s: Mapping[str, Any]) -> Check:
    corrupted = s.get("gradients_corrupted")
    refused = s.get("gradients_refused_nonfinite")
    name, expected = "corrupt_refused", "refused == corrupted > 0"
    if not isinstance(corrupted, int) or not isinstance(refused, int):
        why = "the summary has no gradients_corrupted / gradients_refused_nonfinite"
        return Check(name, None, None, expected, why)
    ok = corrupted > 0 and refused == corrupted
    why = "" if corrupted > 0 else "no gradient was corrupted"
    observed = {"corrupted": corrupted, "refused": refused}
    return Check(name, ok, observed, expected, why)


def evaluate_criteria(
    drill: DrillSpec,
    job_state: str,
    summary: Mapping[str, Any],
    coverage: Sequence[FaultCoverage],
) -> list[Check]:
    """One :class:`Check` per criterion the drill sets, in the criteria's order."""
    c, s = drill.criteria, summary
    checks: list[Check] = []
    if c.finished:
        ok = job_state == JobState.SUCCEEDED.value
        checks.append(Check("finished", ok, job_state, JobState.SUCCEEDED.value))
    if c.min_test_accuracy is not None:
        checks.append(check_accuracy(c.min_test_accuracy, s))
    if c.b_hat_within_bound:
        checks.append(check_bound(s))
    if c.max_recovery_s is not None:
        checks.append(check_recovery(c.max_recovery_s, s))
    if c.max_steps_lost is not None:
        checks.append(check_steps_lost(c.max_steps_lost, s))
    if c.max_detect_s is not None:
        checks.append(check_detect(c.max_detect_s, s))
    if c.faults_recorded:
        checks.append(check_coverage(coverage))
    if c.corrupt_refused:
        checks.append(check_corrupt_refused(s))
    return checks
