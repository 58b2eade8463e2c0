"""``elastic-sgd``: the command line.

Service commands talk to a running service over HTTP (``--url`` / ``ESGD_URL``, bearer
token from ``--token`` / ``ESGD_TOKEN``) through the SDK's :class:`elastic_sgd.Client`:
``serve`` starts one; ``submit``, ``status``, ``cancel``, ``scale``, ``inject``, ``drill``
and ``logs`` use it. Local commands (``run``) need no service: they sit in their own
section at the end.

Exit codes: 0 success (for ``submit --watch`` and ``drill``: the job succeeded / the drill
passed), 1 the job or drill did not succeed, 2 the request was refused (bad input, unknown
id, forbidden state, auth) or the service cannot be reached.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from api.schemas import EventPublic
from core.errors import ElasticSGDError, SpecError
from core.spec import load_spec
from elastic_sgd import ApiError, Client, ServiceError
from elastic_sgd.client import DEFAULT_URL
from service.jobs import parse_fault

app = typer.Typer(
    name="elastic-sgd",
    help="Elastic-consistency distributed SGD on Ray: run jobs, serve the API, drive it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


UrlOpt = Annotated[
    str, typer.Option("--url", envvar="ESGD_URL", help="service address", show_default=True)
]
TensorBoardOpt = Annotated[
    bool,
    typer.Option(
        "--tensorboard",
        help="also write the metrics as TensorBoard event files (tensorboard/ in the job's "
        "folder), as the spec's `tensorboard: true` does",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="ESGD_TOKEN", help="bearer token of the service", show_default=False
    ),
]
IntervalOpt = Annotated[
    float, typer.Option("--interval", min=0.05, max=60.0, help="seconds between polls")
]


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def fail_problems(exc: SpecError | ElasticSGDError) -> NoReturn:
    if isinstance(exc, SpecError):
        err_console.print("[bold red]error:[/] invalid input:")
        for path, msg in exc.problems:
            err_console.print(f"  [bold]{path}[/]: {msg}")
        raise typer.Exit(2)
    fail(str(exc))


@contextmanager
def refusals() -> Iterator[None]:
    """What the service refused, or no answer at all, as a message on stderr and exit
    code 2: the refused fields one per line, else the service's reason."""
    try:
        yield
    except ApiError as exc:
        if exc.errors:
            err_console.print(f"[bold red]error {exc.status}:[/] refused:")
            for e in exc.errors:
                err_console.print(f"  [bold]{e.path}[/]: {e.message}")
            raise typer.Exit(2) from None
        fail(f"{exc.status}: {exc.detail}")
    except ServiceError as exc:
        fail(str(exc))


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def _when(t: datetime | None) -> str:
    if t is None:
        return "-"
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


_STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "recovering": "magenta",
    "pending": "dim",
    "starting": "blue",
}


def _state(s: str) -> str:
    return f"[{_STATE_STYLE.get(s, 'white')}]{s}[/]"


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML: {exc}")


# -- service commands ---------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address [ESGD_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [ESGD_PORT]")] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="database and runs [ESGD_STATE_DIR]")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="npz datasets [ESGD_DATA_DIR]")] = None,
    token: Annotated[
        str | None, typer.Option(help="bearer token [ESGD_TOKEN]", show_default=False)
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster: host:port, auto or ray://...; none (or empty) starts Ray "
            "in-process [ESGD_RAY_ADDRESS, else RAY_ADDRESS]"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Start the service (REST API, dashboard at /, Prometheus at /metrics)."""
    import logging

    import uvicorn

    from api.main import create_app
    from service.settings import SettingsError, load_settings

    try:
        settings = load_settings(
            host=host,
            port=port,
            state_dir=state_dir,
            data_dir=data_dir,
            token=token,
            ray_address=ray_address,
        )
    except SettingsError as exc:
        err_console.print("[bold red]error:[/] refused settings:")
        for path, msg in exc.problems:
            err_console.print(f"  [bold]{path}[/]: {msg}")
        raise typer.Exit(2) from None
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="job spec (YAML)")],
    watch: Annotated[bool, typer.Option("--watch", help="follow the job to its end")] = False,
    tensorboard: TensorBoardOpt = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    interval: IntervalOpt = 0.5,
) -> None:
    """Submit a job spec; with --watch, show a progress bar until the job ends."""
    try:
        spec = load_spec(file)  # refuse bad specs here, with the same messages as the API
    except SpecError as exc:
        fail_problems(exc)
    if tensorboard:
        spec = spec.model_copy(update={"tensorboard": True})
    with refusals(), Client(url, token) as client:
        job = client.submit(spec)
        console.print(f"submitted job [bold]{job.id}[/] ({job.name}): {_state(job.state)}")
        if watch:
            code = _watch(client, job.id, interval)
    if watch:
        raise typer.Exit(code)


def _watch(client: Client, job_id: str, interval: float) -> int:
    """Progress bar with loss, accuracy and B-hat until the job ends; returns the exit code."""
    after_id = 0
    loss = acc = None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(job_id, total=None, info="")
        after_seq = -1
        while True:
            job = client.get(job_id)
            page = client.metrics(job_id, after_seq=after_seq)
            for r in page.items:
                if r.kind == "step" and r.loss is not None:
                    loss = r.loss
                if r.kind == "eval" and r.test_accuracy is not None:
                    acc = r.test_accuracy
            if page.last_seq is not None:
                after_seq = page.last_seq
            events = client.events(job_id, after_id=after_id)
            for e in events.items:
                if e.kind != "state" or e.source == "service":
                    bar.console.print(_event_line(e))
            if events.last_id is not None:
                after_id = events.last_id
            bar.update(
                task,
                description=f"{job_id} {job.state}",
                total=job.total_steps,
                completed=job.step,
                info=f"loss {_fmt(loss)}  acc {_fmt(acc, '.3f')}  "
                f"B̂ max {_fmt(job.b_hat_max, '.3g')}  "
                f"bound {_fmt(job.bound, '.3g')}  workers {len(job.workers)}",
            )
            if job.terminal:
                break
            time.sleep(interval)
    detail = client.get(job_id)
    console.print(
        f"job {job_id}: {_state(detail.state)}" + (f" — {detail.error}" if detail.error else "")
    )
    if detail.summary:
        s = detail.summary
        cons = s.get("consistency") or {}
        console.print(
            f"  final test accuracy {_fmt(s.get('final_test_accuracy'), '.4f')}, "
            f"steps {s.get('steps')}, {_fmt(s.get('samples_per_s'), '.0f')} samples/s, "
            f"B̂ max {_fmt(cons.get('b_hat_max'), '.3g')} (bound "
            f"{_fmt(cons.get('bound'), '.3g')})"
        )
    return 0 if detail.state == "succeeded" else 1


def _event_line(e: EventPublic) -> str:
    step = "-" if e.step is None else str(e.step)
    return (
        f"[dim]{_when(e.wall_time)} step {step:>6}[/] {e.kind:<12} {e.target or '':<10} {e.detail}"
    )


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="a job id; omit to list jobs")] = None,
    state: Annotated[list[str] | None, typer.Option("--state", help="only these states")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """List jobs, or show one job with its workers."""
    with refusals(), Client(url, token) as client:
        if job_id is None:
            page = client.list(state, limit=limit)
        else:
            j = client.get(job_id)
    if job_id is None:
        if as_json:
            console.print_json(page.model_dump_json())
            return
        t = Table(title=f"jobs ({page.total} total)")
        for col in ("id", "name", "state", "step", "B̂ max", "bound", "workers", "created"):
            t.add_column(col)
        for row in page.items:
            t.add_row(
                row.id,
                row.name,
                _state(row.state),
                f"{row.step}/{row.total_steps or '?'}",
                _fmt(row.b_hat_max, ".3g"),
                _fmt(row.bound, ".3g"),
                str(len(row.workers)),
                _when(row.created_at),
            )
        console.print(t)
        return
    if as_json:
        console.print_json(j.model_dump_json())
        return
    console.print(
        f"[bold]{j.id}[/] {j.name}: {_state(j.state)}  step "
        f"{j.step}/{j.total_steps or '?'}  B̂ max {_fmt(j.b_hat_max, '.3g')}"
        f" mean {_fmt(j.b_hat_mean, '.3g')} bound {_fmt(j.bound, '.3g')}"
    )
    if j.error:
        console.print(f"  [red]error:[/] {j.error}")
    if j.workers:
        t = Table("worker", "state", "node", "step")
        for w in j.workers:
            t.add_row(str(w.id), w.state, w.node or "-", str(w.step))
        console.print(t)
    if j.summary:
        s = j.summary
        console.print(
            f"  final test accuracy {_fmt(s.get('final_test_accuracy'), '.4f')}, "
            f"wall {_fmt(s.get('wall_seconds'), '.1f')} s"
        )


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="job id")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Cancel a job."""
    with refusals(), Client(url, token) as client:
        j = client.cancel(job_id)
    console.print(f"cancel requested for {job_id}: now {_state(j.state)}")


@app.command()
def scale(
    job_id: Annotated[str, typer.Argument(help="job id")],
    workers: Annotated[int, typer.Argument(min=1, max=4096, help="new number of workers")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Change the number of workers of a running job."""
    with refusals(), Client(url, token) as client:
        client.scale(job_id, workers)
    console.print(f"scaling {job_id} to {workers} workers")


@app.command()
def inject(
    job_id: Annotated[str, typer.Argument(help="job id")],
    kind: Annotated[
        str,
        typer.Option("--kind", help="crash, drop, delay, partition, coordinator_crash or corrupt"),
    ],
    workers: Annotated[str | None, typer.Option(help="worker ids, e.g. 0,2")] = None,
    count: Annotated[int | None, typer.Option(help="or: this many workers, picked by seed")] = None,
    at_step: Annotated[int | None, typer.Option(help="fire at this step (default: now)")] = None,
    probability: Annotated[float | None, typer.Option(help="per-step probability")] = None,
    duration_s: Annotated[float | None, typer.Option(help="window length (s)")] = None,
    duration_steps: Annotated[int | None, typer.Option(help="window length (steps)")] = None,
    delay_ms: Annotated[float | None, typer.Option(help="delay per step (ms)")] = None,
    distribution: Annotated[str | None, typer.Option(help="constant, exponential, pareto")] = None,
    rejoin_after_s: Annotated[float | None, typer.Option(help="crash: rejoin after (s)")] = None,
    corruption: Annotated[str | None, typer.Option(help="corrupt: nan, inf or scale")] = None,
    scale_factor: Annotated[
        float | None, typer.Option(help="corrupt (scale): multiply each gradient by this")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Inject a fault into a running job."""
    data: dict[str, Any] = {"kind": kind}
    if workers is not None:
        try:
            data["workers"] = [int(w) for w in workers.split(",") if w.strip()]
        except ValueError:
            fail(f"--workers takes comma-separated worker ids (e.g. 0,2), got {workers!r}")
    for key, value in (
        ("count", count),
        ("at_step", at_step),
        ("probability", probability),
        ("duration_s", duration_s),
        ("duration_steps", duration_steps),
        ("delay_ms", delay_ms),
        ("distribution", distribution),
        ("rejoin_after_s", rejoin_after_s),
        ("corruption", corruption),
        ("scale_factor", scale_factor),
    ):
        if value is not None:
            data[key] = value
    try:
        fault = parse_fault(data)
    except SpecError as exc:
        fail_problems(exc)
    with refusals(), Client(url, token) as client:
        client.inject(job_id, fault)
    console.print(f"{kind} fault sent to job {job_id}")


@app.command()
def drill(
    file: Annotated[Path, typer.Argument(help="drill (YAML: name, job, criteria)")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="run it locally (no service); the report goes here"),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="with --out: where npz datasets live")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    interval: IntervalOpt = 1.0,
) -> None:
    """Run a drill on the service (or locally with --out DIR) and print its report (exit 0
    if it passed)."""
    from service.drills.spec import parse_drill

    try:
        spec = parse_drill(_read_yaml(file))
    except SpecError as exc:
        fail_problems(exc)
    if out is not None:  # local: run_drill writes report.{json,md,png} into out
        from service.drills.run import run_drill

        rep = run_drill(spec, out, data_dir=data_dir, progress=True)
        state = "passed" if rep["passed"] else "failed"
        local = {"id": str(out), "name": spec.name, "state": state, "error": rep["error"]}
        _print_drill({**local, "report": rep})
        console.print(f"report: {out / 'report.md'} (and report.json, report.png)")
        raise typer.Exit(0 if rep["passed"] else 1)
    with refusals(), Client(url, token) as client:
        d = client.submit_drill(spec)
        console.print(f"drill [bold]{d.id}[/] ({d.name}) runs as job {d.job_id}")
        with console.status("drill running..."):
            while d.state == "running":
                time.sleep(interval)
                d = client.get_drill(d.id)
    _print_drill(d.model_dump(mode="json"))
    raise typer.Exit(0 if d.state == "passed" else 1)


def _print_drill(d: dict[str, Any]) -> None:
    console.print(
        f"drill {d['id']} ({d['name']}): {d['state']}"
        + (f" — {d['error']}" if d.get("error") else "")
    )
    rep = d.get("report") or {}
    if rep.get("checks"):
        t = Table("check", "result", "observed", "expected", "note")
        for c in rep["checks"]:
            res = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[dim]n/a[/]"}[c["passed"]]
            t.add_row(
                c["name"],
                res,
                str(c.get("observed")),
                str(c.get("expected")),
                c.get("detail") or "",
            )
        console.print(t)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="job id")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing until the job ends")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    interval: IntervalOpt = 0.5,
) -> None:
    """Print a job's events (state changes, faults, membership, checkpoints)."""
    with refusals(), Client(url, token) as client:
        after_id = 0
        while True:
            page = client.events(job_id, after_id=after_id)
            for e in page.items:
                console.print(_event_line(e), highlight=False)
            if page.last_id is not None:
                after_id = page.last_id
            if not follow or (client.get(job_id).terminal and not page.items):
                return
            time.sleep(interval)


# -- local commands (no service) ------------------------------------------------------------


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="job spec (YAML)")],
    out: Annotated[Path, typer.Option("--out", help="folder for metrics, model, summary")] = Path(
        "runs/latest"
    ),
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="where npz datasets live")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    placement_timeout_s: Annotated[
        float,
        typer.Option(
            "--placement-timeout-s",
            min=0.0,
            help="seconds to wait for the cluster to have room for the job's actors before "
            "failing (what it needs and what the cluster has is said at once)",
        ),
    ] = 60.0,
    tensorboard: TensorBoardOpt = False,
) -> None:
    """Run one job on a local Ray instance (or RAY_ADDRESS) without the service."""
    from elastic_sgd.local import run as run_job

    try:
        done = run_job(
            load_spec(config),
            out,
            data_dir=data_dir,
            tensorboard=True if tensorboard else None,
            progress=not quiet,
            placement_timeout_s=placement_timeout_s,
        )
    except (SpecError, ElasticSGDError) as exc:
        fail_problems(exc)
    summary = done.summary
    cons = summary["consistency"]
    console.print(
        f"[bold]{summary['state']}[/]: {summary['steps']} steps in {summary['wall_seconds']:.1f} s "
        f"({summary['samples_per_s']:.0f} samples/s), test accuracy "
        f"{_fmt(summary['final_test_accuracy'])}, test loss {_fmt(summary['final_test_loss'])}, "
        f"B̂ max {_fmt(cons['b_hat_max'])} (bound {_fmt(cons['bound'])}) -> {out}"
    )
    if done.tensorboard_dir is not None:
        console.print(f"TensorBoard: tensorboard --logdir {done.tensorboard_dir}")
    if summary["state"] != "succeeded":
        raise typer.Exit(1)


if __name__ == "__main__":  # python -m cli.main
    app()
