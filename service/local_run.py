"""``elastic-sgd run``: one job on local Ray (or ``RAY_ADDRESS``), with a progress bar."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from core.events import EvalRecord, EventKind, StepRecord
from core.spec import JobSpec
from service.runner import JobRunner


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def run_local(
    spec: JobSpec,
    out_dir: Path,
    *,
    data_dir: Path | None = None,
    progress: bool = True,
    poll_interval_s: float = 0.25,
    job_id: str | None = None,
    placement_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Run ``spec`` to the end; writes ``out_dir/{metrics.jsonl,model.pt,summary.json}``.

    If the cluster has no room for the job's actors, says at once what the job needs and
    what the cluster has (on stderr, even with ``progress`` off), and waits at most
    ``placement_timeout_s`` for room.

    Returns:
        The run's summary (also in ``summary.json``).

    Raises:
        TrainingFailed: no room within ``placement_timeout_s`` (the message says what the
            job needs and what the cluster has), or the start failed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    console = Console(stderr=True, quiet=not progress)
    runner = JobRunner(
        job_id or f"run-{uuid.uuid4().hex[:8]}",
        spec,
        out_dir,
        data_dir=data_dir,
        detached=False,
        placement_timeout_s=placement_timeout_s,
        on_wait=lambda msg: Console(stderr=True).print(f"[yellow]waiting[/]: {msg}"),
    )
    try:
        runner.start()
    except BaseException:
        runner.release()  # a start that failed half-way leaves nothing behind
        raise
    try:
        loss = acc = None
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not progress,
        ) as bar:
            task = bar.add_task(spec.name, total=None, info="")
            while True:
                done = runner.done()
                p = runner.poll()
                for r in p.records:
                    if isinstance(r, StepRecord) and r.loss is not None:
                        loss = r.loss
                    if isinstance(r, EvalRecord):
                        acc = r.get("test_accuracy")
                for e in p.events:
                    if e.kind is not EventKind.STATE and progress:
                        console.print(
                            f"[dim]{e.time_s:7.2f}s step {e.step:>5}[/] "
                            f"{e.kind:<10} {e.target or '':<10} {e.detail}"
                        )
                st = p.status
                live = sum(w["state"] not in ("dead", "left") for w in st.get("workers", []))
                bar.update(
                    task,
                    total=st.get("total_steps"),
                    completed=st.get("step", 0),
                    info=f"loss {_fmt(loss)}  acc {_fmt(acc, '.3f')}  "
                    f"B̂ max {_fmt(st.get('b_hat_max'), '.3g')}  "
                    f"bound {_fmt(st.get('bound'), '.3g')}  "
                    f"workers {live}",
                )
                if done:
                    break
                time.sleep(poll_interval_s)
    except BaseException:
        runner.release()  # never leave the (detached) workers behind
        raise
    return runner.finish()
