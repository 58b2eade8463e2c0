"""Throughput: samples/s of each consistency mode with 2 workers against plain PyTorch.

Two workloads: digits with a small MLP (a step costs well under a millisecond of compute, so
the per-step overhead of the runtime shows) and a synthetic one with a 1.6M-parameter MLP
(each step moves 6.3 MB of gradient and of view per worker, so the data path shows). Each
runs as plain single-process PyTorch (``torch.optim.SGD``, the same model, data and global
batch, torch's default threads = every core) and as an elastic-sgd job with 2 workers in
every mode, plus synchronous runs over Ray's object store (float32 and bfloat16 on the
wire) to show what the shared-memory path buys. A ceiling row runs what no data-parallel
scheme can beat here: one process per worker, one thread each, computing forward and
backward on its own batch at the same time, and nothing else.

Rates are steady-state (see :mod:`bench.common`). The ratio to plain PyTorch is the number
that matters; issue 10's targets on the 1.6M-parameter workload: sync >= 0.9x and elastic
>= 0.95x plain PyTorch.

Run: ``python -m bench.throughput [--repeats N] [--quick]``.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actors.datasets import load_dataset, loss_fn
from actors.flat import ParamLayout
from actors.models import build_model, n_parameters
from actors.optim import make_optimizer, torch_param_groups
from actors.sampler import ShardSampler
from actors.schedules import make_scheduler
from bench.common import (
    NOT_A_VERDICT,
    base_parser,
    command_line,
    fmt,
    init_ray,
    load_average,
    load_note,
    machine_info,
    median,
    publish,
    run_header,
    run_job,
    say,
    steady_rate,
    step_points,
)
from core.spec import JobSpec, parse_spec

NAME = "throughput"
WORKERS = 2
DEFAULT_REPEATS = 3
# Issue 10's targets on TARGET_WORKLOAD: samples/s of each mode against plain PyTorch.
TARGET_RATIOS = {"sync": 0.9, "elastic": 0.95}
TARGET_WORKLOAD = "synthetic-1.6M"
# 2 workers x 0.5 + coordinator 0.5 = 1.5 CPUs of Ray's 2: all three fit on a 2-core box.
RESOURCES = {"worker_cpus": 0.5, "coordinator_cpus": 0.5}
# Measure B̂ on every 10th view only: the measurement clones a view, which is not free at
# 1.6M parameters and is not part of training.
MONITOR_INTERVAL = 10


@dataclass(frozen=True)
class Workload:
    """A model, dataset and per-worker batch to time."""

    name: str
    dataset: dict[str, Any]
    hidden: list[int]
    batch_per_worker: int
    optimizer: dict[str, Any]
    steps: int  # full run
    quick_steps: int  # --quick

    def spec(self, variant: Variant, steps: int, seed: int) -> dict[str, Any]:
        """The job spec of ``variant`` on this workload."""
        return {
            "name": f"bench-{self.name}-{variant.name.replace('/', '-')}",
            "model": {"name": "mlp", "hidden": self.hidden},
            "dataset": self.dataset,
            "batch_size": self.batch_per_worker,
            "steps": steps,
            "workers": WORKERS,
            "optimizer": self.optimizer,
            "mode": variant.mode,
            "seed": seed,
            # no evaluation inside the run (only at the start and the end)
            "eval_interval": steps + 1,
            "monitor_interval": MONITOR_INTERVAL,
            "resources": RESOURCES,
            "transport": variant.transport,
            "transfer_dtype": variant.transfer_dtype,
        }


WORKLOADS = [
    # digits: 64 features -> 64 -> 10 = 4,810 parameters; the configs' optimizer
    Workload(
        name="digits-mlp64",
        dataset={"name": "digits"},
        hidden=[64],
        batch_per_worker=32,
        optimizer={"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0001},
        steps=1000,
        quick_steps=60,
    ),
    # 512*1024+1024 + 1024*1024+1024 + 1024*10+10 = 1,585,162 parameters (6.3 MB float32)
    Workload(
        name=TARGET_WORKLOAD,
        dataset={"name": "synthetic_classification", "n_features": 512, "n_classes": 10},
        hidden=[1024, 1024],
        batch_per_worker=128,
        optimizer={"lr": 0.01, "momentum": 0.9},
        steps=200,
        quick_steps=20,
    ),
]


@dataclass(frozen=True)
class Variant:
    """A consistency mode and a data path."""

    name: str
    mode: dict[str, Any]
    transport: str = "auto"
    transfer_dtype: str = "float32"


SYNC = {"name": "sync"}
VARIANTS = [
    Variant("sync", SYNC),
    Variant("elastic", {"name": "elastic", "beta": 0.5, "max_lag": 2}),
    Variant("async", {"name": "async", "max_staleness": 4}),
    Variant("sync/object_store", SYNC, transport="object_store"),
    Variant("sync/object_store/bf16", SYNC, transport="object_store", transfer_dtype="bfloat16"),
]
PLAIN = "plain PyTorch"
# A reference row, not the baseline: plain PyTorch on one thread shows how much of the
# baseline comes from torch's intra-op parallelism (each worker computes on one thread).
PLAIN_1T = "plain PyTorch, 1 thread"
# The ceiling of any data-parallel run here: WORKERS processes at once, one thread each,
# each its forward and backward on its own batch_per_worker rows, nothing else (no
# optimizer step, no communication); the rate is their samples over the slowest one's time.
CEILING = f"ceiling: {WORKERS} processes x 1 thread, forward+backward only"


def run_plain(spec: JobSpec, threads: int | None = None) -> dict[str, Any]:
    """Train ``spec``'s model in this process with the job's ``torch.optim`` optimizer (SGD,
    Adam or AdamW; its schedule, clipping and parameter groups) on the global batch.

    Same dataset (and split), model, initial weights and optimizer settings as the job,
    one sampler over the whole training set drawing ``workers x batch_size`` rows per step.
    Timed like a job: a ``(step, wall time, samples)`` point after every step.

    Args:
        spec: the job to mirror.
        threads: torch intra-op threads for this run (``None``: torch's default, every core).
    """
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train_plain(spec)
    finally:
        torch.set_num_threads(default_threads)


def _plain_setup(
    spec: JobSpec, shard_key: int
) -> tuple[
    torch.nn.Module,
    Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    torch.Tensor,
    torch.Tensor,
    ShardSampler,
]:
    """The job's model (initialised as the coordinator does), its loss, the training rows
    and a sampler over all of them, for training it outside elastic-sgd."""
    ds = load_dataset(spec.dataset, spec.seed)
    torch.manual_seed(spec.seed)  # as the coordinator does before building the model
    model = build_model(spec.model, ds.n_features, ds.n_outputs, ds.input_shape)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    sampler = ShardSampler(np.arange(len(x)), seed=spec.seed, shard_key=shard_key)
    return model, loss_fn(ds.task), x, y, sampler


def _train_plain(spec: JobSpec) -> dict[str, Any]:
    """:func:`run_plain` on the threads torch has now."""
    model, loss_of, x, y, sampler = _plain_setup(spec, shard_key=0)
    o = spec.optimizer
    # the same torch objects the coordinator builds (actors/optim.py), over the module's own
    # parameters: plain PyTorch, no flat vector
    params = list(model.parameters())
    opt = make_optimizer(o, torch_param_groups(o, ParamLayout.of(model), params))
    sched = make_scheduler(o, opt, spec.total_steps(len(x)))
    global_batch = spec.workers * spec.batch_size
    steps = spec.total_steps(len(x))
    points = [(0.0, time.time(), 0.0)]
    t0 = time.perf_counter()
    loss = float("nan")
    for step in range(1, steps + 1):
        idx = torch.from_numpy(sampler.next_batch(global_batch))
        opt.zero_grad(set_to_none=True)
        out = loss_of(model(x[idx]), y[idx])
        out.backward()
        if o.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, o.clip_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        loss = float(out.detach())
        points.append((float(step), time.time(), float(step * global_batch)))
    wall = time.perf_counter() - t0
    return {
        "steady_samples_per_s": steady_rate(points),
        "samples_per_s": steps * global_batch / wall,
        "final_loss": loss,
        "torch_threads": torch.get_num_threads(),
    }


def _ceiling_child(spec_json: dict[str, Any], worker: int, conn: Any) -> None:
    """One process of :func:`run_ceiling`: its shard's batches, forward and backward."""
    torch.set_num_threads(1)
    spec = parse_spec(spec_json)
    model, loss_of, x, y, sampler = _plain_setup(spec, shard_key=worker)
    steps = spec.total_steps(len(x))
    conn.send("ready")
    conn.recv()  # every process starts its timed loop together
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.from_numpy(sampler.next_batch(spec.batch_size))
        model.zero_grad(set_to_none=True)
        loss_of(model(x[idx]), y[idx]).backward()
    conn.send((time.perf_counter() - t0, steps))


def run_ceiling(spec: JobSpec) -> dict[str, Any]:
    """:data:`CEILING`: ``spec.workers`` spawned processes computing at once."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for w in range(spec.workers):
        here, there = ctx.Pipe()
        p = ctx.Process(target=_ceiling_child, args=(spec.model_dump(mode="json"), w, there))
        p.start()
        pipes.append(here)
        procs.append(p)
    try:
        for c in pipes:
            assert c.recv() == "ready"
        for c in pipes:
            c.send("go")
        timed = [c.recv() for c in pipes]
    finally:
        for p in procs:
            p.join(60)
    rate = sum(spec.batch_size * steps for _, steps in timed) / max(w for w, _ in timed)
    return {"steady_samples_per_s": rate, "samples_per_s": rate, "torch_threads": 1}


def run_variant(spec: JobSpec) -> dict[str, Any]:
    """One elastic-sgd job; its steady and whole-run rates, timing and consistency."""
    run = run_job(spec.model_dump())
    s = run.summary
    return {
        "steady_samples_per_s": steady_rate(step_points(run)),
        "samples_per_s": s["samples_per_s"],
        "timing": s["timing"],
        "wall_seconds": s["wall_seconds"],
        "refused_stale": s["refused_stale"],
        "final_loss": next(
            (r["loss"] for r in reversed(run.steps) if r.get("loss") is not None), None
        ),
        "b_hat_max": s["consistency"]["b_hat_max"],
        "bound": s["consistency"]["bound"],
        "transports": _transports(s["events"]),
    }


def _transports(events: list[dict[str, Any]]) -> list[str]:
    """The data planes the workers joined with (from the coordinator's membership events,
    whose detail ends in "shared memory" or "object store")."""
    joined = [e["detail"] for e in events if e["kind"] == "membership" and "joined" in e["detail"]]
    return sorted({"shared_memory" if "shared memory" in d else "object_store" for d in joined})


def _aggregate(runs: list[dict[str, Any]], plain_median: float | None) -> dict[str, Any]:
    rates = [r["steady_samples_per_s"] for r in runs]
    agg: dict[str, Any] = {
        "steady_samples_per_s": rates,
        "median_samples_per_s": median(rates),
        "median_run_samples_per_s": median([r["samples_per_s"] for r in runs]),
        "runs": runs,
    }
    if plain_median:
        agg["ratio_to_plain"] = agg["median_samples_per_s"] / plain_median
    if runs and "timing" in runs[0]:
        keys = runs[0]["timing"]
        agg["timing_median"] = {k: median([r["timing"][k] for r in runs]) for k in keys}
    return agg


def measure(
    workload: Workload, steps: int, repeats: int, variants: Sequence[Variant]
) -> dict[str, Any]:
    """``variants`` and plain PyTorch on ``workload``, interleaved per repeat (so slow
    phases of a noisy machine spread over all of them)."""
    raw: dict[str, list[dict[str, Any]]] = {PLAIN: [], PLAIN_1T: [], CEILING: []}
    raw.update({v.name: [] for v in variants})
    spec0 = parse_spec(workload.spec(VARIANTS[0], steps, seed=0))
    ds = load_dataset(spec0.dataset, spec0.seed)
    params = n_parameters(build_model(spec0.model, ds.n_features, ds.n_outputs, ds.input_shape))
    for rep in range(repeats):
        for label in raw:
            v = next((v for v in variants if v.name == label), VARIANTS[0])
            spec = parse_spec(workload.spec(v, steps, seed=rep))
            say(f"[throughput] {workload.name} {label} repeat {rep + 1}/{repeats}")
            if label == PLAIN:
                raw[label].append(run_plain(spec))
            elif label == PLAIN_1T:
                raw[label].append(run_plain(spec, threads=1))
            elif label == CEILING:
                raw[label].append(run_ceiling(spec))
            else:
                raw[label].append(run_variant(spec))
            say(f"    {raw[label][-1]['steady_samples_per_s']:.0f} samples/s")
    plain = _aggregate(raw[PLAIN], None)
    return {
        "parameters": params,
        "batch_per_worker": workload.batch_per_worker,
        "global_batch": WORKERS * workload.batch_per_worker,
        "steps": steps,
        "dataset": workload.dataset,
        "hidden": workload.hidden,
        "optimizer": workload.optimizer,
        "results": {
            PLAIN: plain,
            PLAIN_1T: _aggregate(raw[PLAIN_1T], plain["median_samples_per_s"]),
            CEILING: _aggregate(raw[CEILING], plain["median_samples_per_s"]),
            **{
                v.name: {
                    "mode": v.mode,
                    "transport": v.transport,
                    "transfer_dtype": v.transfer_dtype,
                    **_aggregate(raw[v.name], plain["median_samples_per_s"]),
                }
                for v in variants
            },
        },
    }


def _step_ms(rate: float, global_batch: int) -> float:
    return 1e3 * global_batch / rate if rate > 0 else float("nan")


def render(payload: dict[str, Any]) -> str:
    """The markdown block for ``docs/benchmarks.md``."""
    note = load_note(payload["load_before"])
    lines = run_header(payload, f"Median of {payload['repeats']} runs.")
    lines += [
        "| workload | run | samples/s (steady) | x plain | step ms | whole-run samples/s "
        "| compute ms | round trip ms | overhead ms | apply ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for wname, w in payload["workloads"].items():
        gb = w["global_batch"]
        for label, r in w["results"].items():
            t = r.get("timing_median", {})
            ratio = r.get("ratio_to_plain", 1.0 if label == PLAIN else None)
            lines.append(
                f"| {wname} ({w['parameters']:,} params, {gb}/step) | {label} "
                f"| {fmt(r['median_samples_per_s'])} | {fmt(ratio, '.2f')} "
                f"| {fmt(_step_ms(r['median_samples_per_s'], gb), '.1f')} "
                f"| {fmt(r['median_run_samples_per_s'])} "
                f"| {fmt(t.get('compute_ms'), '.2f')} | {fmt(t.get('roundtrip_ms'), '.2f')} "
                f"| {fmt(t.get('overhead_ms'), '.2f')} | {fmt(t.get('apply_ms'), '.2f')} |"
            )
    lines += [
        "",
        f"Targets on {TARGET_WORKLOAD} (x plain PyTorch): "
        + "; ".join(_verdict(t) for t in payload["targets"])
        + "."
        + (f" {NOT_A_VERDICT}" if note else ""),
    ]
    return "\n".join(lines)


def _verdict(t: dict[str, Any]) -> str:
    """One target of :func:`targets`, as the table's last line says it."""
    head = f"{t['mode']} >= {t['ratio']:.2f}x: "
    if t["measured"] is None:
        return head + "not run"
    said = f"**{fmt(t['measured'], '.2f')}x, {'met' if t['met'] else 'missed'}**"
    if not t["met"]:
        said += f" (short by {fmt(t['short_by'], '.2f')}x)"
    return head + said


def targets(workloads: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of :data:`TARGET_RATIOS` with the measured ratio and its verdict."""
    results = workloads[TARGET_WORKLOAD]["results"]
    out = []
    for mode, want in TARGET_RATIOS.items():
        ratio = results.get(mode, {}).get("ratio_to_plain")  # None: not run (--quick)
        out.append(
            {
                "workload": TARGET_WORKLOAD,
                "mode": mode,
                "ratio": want,
                "measured": ratio,
                "met": ratio is not None and ratio >= want,
                "short_by": None if ratio is None else max(0.0, want - ratio),
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = base_parser(__doc__.splitlines()[0] if __doc__ else NAME).parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
    load_before = load_average()
    say(f"[throughput] load average {load_before} on {torch.get_num_threads()} torch threads")
    init_ray()
    workloads = {}
    for i, w in enumerate(WORKLOADS):
        # --quick: every variant on the first (small) workload, only sync on the others;
        # starting a job's actors costs seconds, more than a quick run's training
        variants = VARIANTS if not args.quick or i == 0 else VARIANTS[:1]
        steps = w.quick_steps if args.quick else w.steps
        workloads[w.name] = measure(w, steps, repeats, variants)
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine_info(command_line("bench.throughput", argv)),
        "quick": args.quick,
        "repeats": repeats,
        "workers": WORKERS,
        "resources": RESOURCES,
        "monitor_interval": MONITOR_INTERVAL,
        "load_before": load_before,
        "load_after": load_average(),
        "targets": targets(workloads),
        "workloads": workloads,
    }
    return publish(NAME, payload, render(payload), args.quick)


if __name__ == "__main__":
    sys.exit(main())
