"""The drill plot: training loss, test accuracy and B̂ over the job's time, faults marked.

:func:`plot_run` draws from typed records and events: every ``FAULT``, ``HEAL`` and
``INJECT`` event is a vertical line in the three panels, coloured and labelled by its fault
kind (``crash worker-1``, ``drop x240``, ``partition healed worker-2``). A fault kind added
later gets a line and a label like the others. matplotlib's object API is used (no pyplot:
no global state, no GUI backend), so plotting is safe from any thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from core.events import COORDINATOR_TARGET, EvalRecord, Event, EventKind, Record, StepRecord

# Events drawn as vertical lines.
MARKED_KINDS = frozenset({EventKind.FAULT, EventKind.HEAL, EventKind.INJECT})
# Events of one label closer than this share one label (seconds).
LABEL_MERGE_S = 0.1
# A label with more events than this is written once with its count ("drop x240").
LABEL_MAX_EVENTS = 8
# More marked events than this: thinner, fainter lines (e.g. every dropped gradient).
MANY_LINES = 40
# Test accuracy the drills ask for (a dotted line in the accuracy panel).
ACCURACY_TARGET = 0.95
COLOURS = ("tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")


def mark_label(e: Event) -> str:
    """What a marked event's line is called (``crash``, ``drop``, ``partition healed``)."""
    name = "fault" if e.fault is None else e.fault.value.replace("_", " ")
    if e.kind is EventKind.HEAL:
        return f"{name} healed"
    if e.kind is EventKind.INJECT:
        return f"injected {name}"
    return name


def fault_labels(marks: Sequence[Event]) -> list[tuple[float, str, str]]:
    """Where to write which label: ``(time_s, label, text)``.

    Events of one label less than :data:`LABEL_MERGE_S` apart share a text listing their
    targets (``delay worker-0, worker-1``); a label with many events (every dropped
    gradient) gets one text with its count, at its first event.
    """
    out: list[tuple[float, str, str]] = []
    by_label: dict[str, list[Event]] = {}
    for e in marks:
        by_label.setdefault(mark_label(e), []).append(e)
    for label, evs in by_label.items():
        if len(evs) > LABEL_MAX_EVENTS:
            out.append((evs[0].time_s, label, f"{label} x{len(evs)}"))
            continue
        groups: list[list[Event]] = []
        for e in evs:
            if groups and e.time_s - groups[-1][0].time_s <= LABEL_MERGE_S:
                groups[-1].append(e)
            else:
                groups.append([e])
        for group in groups:
            targets = [g.target for g in group if g.target and g.target != COORDINATOR_TARGET]
            text = f"{label} {', '.join(dict.fromkeys(targets))}".strip()
            out.append((group[0].time_s, label, text))
    return sorted(out)


def plot_run(
    records: Sequence[Record], events: Sequence[Event], path: Path, *, title: str = ""
) -> bool:
    """Training loss, test accuracy and B̂ (with its bound) over time, faults marked.

    Args:
        records: the run's step and eval records.
        events: the run's events (those of :data:`MARKED_KINDS` are drawn).
        path: the PNG to write.
        title: the figure's title.

    Returns:
        False (and no file) when there are no records to plot.
    """
    from matplotlib.figure import Figure  # imported here: matplotlib takes ~1 s to load

    steps = [r for r in records if isinstance(r, StepRecord)]
    evals = [r for r in records if isinstance(r, EvalRecord) and r.get("test_accuracy") is not None]
    if not steps and not evals:
        return False
    fig = Figure(figsize=(10, 8), layout="constrained")
    ax_loss, ax_acc, ax_b = fig.subplots(3, 1, sharex=True)
    losses = [(r.time_s, r.loss) for r in steps if r.loss is not None]
    ax_loss.plot([t for t, _ in losses], [x for _, x in losses], lw=0.8)
    ax_loss.set_ylabel("training loss")
    ax_acc.plot(
        [r.time_s for r in evals],
        [r.get("test_accuracy") for r in evals],
        marker="o",
        ms=3,
        color="tab:green",
    )
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(0.0, 1.02)
    ax_acc.axhline(ACCURACY_TARGET, color="tab:green", ls=":", lw=0.8)
    ts = [r.time_s for r in steps]
    ax_b.plot(ts, [r.b_hat for r in steps], lw=0.8, label="B̂ (last view)")
    ax_b.plot(ts, [r.b_hat_max for r in steps], lw=1.0, label="B̂ max")
    bound = [(r.time_s, r.bound) for r in steps if r.bound is not None]
    if bound:
        ax_b.plot(*zip(*bound, strict=True), color="black", ls="--", lw=1.0, label="bound")
    ax_b.set_ylabel("B̂ (gradient units)")
    ax_b.set_xlabel("time since the job started (s)")
    ax_b.legend(loc="upper left", fontsize=8)
    marks = [e for e in events if e.kind in MARKED_KINDS]
    labels = sorted({mark_label(e) for e in marks})
    colour = {k: COLOURS[i % len(COLOURS)] for i, k in enumerate(labels)}
    many = len(marks) > MANY_LINES
    for e in marks:
        for ax in (ax_loss, ax_acc, ax_b):
            ax.axvline(
                e.time_s,
                color=colour[mark_label(e)],
                lw=0.4 if many else 1.0,
                alpha=0.35 if many else 0.8,
            )
    for n, (x, label, text) in enumerate(fault_labels(marks)):
        ax_loss.annotate(
            text,
            xy=(x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2 - 10 * (n % 12)),  # 12 rows of 10 points, then from the top again
            textcoords="offset points",
            va="top",
            fontsize=8,
            color=colour[label],
        )
    fig.suptitle(title or "drill")
    fig.savefig(path, dpi=100)
    return True
