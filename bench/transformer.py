"""Transformer: the gpt_bytes example's tokens/s, straggler tolerance and memory, 2 workers.

The workload is ``configs/gpt_bytes.yaml``'s model (the ``gpt_bytes`` example task at its
defaults: 7,644,416 parameters, 256 bytes of context) with 4 windows per worker, so a step
is 2 workers x 4 x 256 = 2,048 tokens, trained with the config's AdamW, warm-up + cosine
and clipping. Three measurements, every job on one Ray instance:

* **Throughput.** Steady-state tokens/s (:mod:`bench.common`'s window x 256 tokens a
  sample) of a sync, an elastic (beta 0.5, max_lag 2) and a straggler-mode (beta 0,
  max_lag 2) job against plain PyTorch on the
  same model, global batch, samples and cores (:mod:`bench.plain_task`, torch's default
  threads = every core; the jobs' 2 workers x 1 thread use the same cores). Targets:
  sync >= 0.9x, elastic >= 0.95x plain. No evaluation inside these runs.
* **Straggler.** Worker 1 is slowed by exponentially distributed delays after each
  gradient whose mean is one step of a fault-free sync run (the calibration run, first).
  Each seed's target validation loss is its own sync run's final one x (1 + 2%) (the
  slack the tests allow between modes): sync is exact, so the straggler's delays do not
  change that run's losses, and every mode of a seed chases the loss its sync run shows
  reachable on that seed's samples. The time to it runs from the first record (the
  evaluation of the initial model) to the first evaluation at or below it. Target:
  elastic <= 0.6x sync.
* **Memory.** The throughput jobs run with the task's read log on: every process logs the
  windows it served and its peak resident memory (``ru_maxrss``). Reported per worker: the
  peak RSS, the windows it read against its shard's, and the check that it read nothing
  outside its shard; and what a worker's dataset object holds (its pickled size: the
  index of paths and offsets) against the shard's bytes.

Run: ``python -m bench.transformer [--repeats N] [--quick]`` (``--quick``: a few steps of
each, to see that it runs; ``--plain-only`` with it times only the plain PyTorch part).
"""

from __future__ import annotations

import math
import pickle
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from gpt_bytes.data import ProcessReads, read_log
from gpt_bytes.task import GPTBytesTask, GPTParams

from actors.sampler import make_shards
from actors.tasks.base import TaskContext
from bench.common import (
    NOT_A_VERDICT,
    REPO,
    Run,
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
    steady_window,
    step_points,
)
from bench.plain_task import PlainJob, train_plain

NAME = "transformer"
CONFIG = REPO / "configs" / "gpt_bytes.yaml"
WORKERS = 2
BATCH_PER_WORKER = 4
DEFAULT_REPEATS = 3
# The issue's targets.
THROUGHPUT_TARGETS = {"sync": 0.9, "elastic": 0.95}  # x plain PyTorch's tokens/s
STRAGGLER_TARGET = 0.6  # elastic's time to the target loss, x sync's
# steps of a throughput run (full / --quick): 40 steps x 2,048 tokens; the steady window
# starts at 20% (step 8), after the actors' start and torch's warm-up
THROUGHPUT_STEPS, QUICK_THROUGHPUT_STEPS = 40, 6
# steps of a straggler run: long enough for the loss to fall well below its start
# (ln 256 = 5.55 nats) at the config's lr and schedule
STRAGGLER_STEPS, QUICK_STRAGGLER_STEPS = 90, 12
EVAL_INTERVAL, QUICK_EVAL_INTERVAL = 10, 4
# 16 validation windows x 256 bytes per evaluation: the coordinator's forward of 4,096
# tokens costs ~2 x 7.6M x 4,096 = 63 GFLOP, a few seconds, taken equally by every mode
EVAL_WINDOWS = 16
# a seed's target validation loss: its sync run's final loss x (1 + 2%)
TARGET_SLACK = 0.02
STRAGGLER = 1  # the slowed worker's id
MODES: dict[str, dict[str, Any]] = {
    "sync": {"name": "sync"},
    "elastic": {"name": "elastic", "beta": 0.5, "max_lag": 2},
    # the straggler-tolerant rule (no target of its own): with 2 workers only beta 0 lets
    # the fast one go on without the slow one's gradient, at most max_lag steps ahead
    "straggler": {"name": "straggler", "beta": 0.0, "max_lag": 2},
}
# 2 workers x 0.5 + coordinator 0.5 = 1.5 of Ray's 2 CPUs; one torch thread per worker
RESOURCES = {"worker_cpus": 0.5, "coordinator_cpus": 0.5, "torch_threads": 1}
PLAIN = "plain PyTorch"


def job(
    mode: str,
    seed: int,
    steps: int,
    eval_interval: int,
    delay_ms: float | None = None,
    read_log_dir: Path | None = None,
) -> dict[str, Any]:
    """``configs/gpt_bytes.yaml`` with the benchmark's settings (and the straggler)."""
    data: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    params = {**data["task"]["params"], "max_eval_windows": EVAL_WINDOWS}
    if read_log_dir is not None:
        params["read_log_dir"] = str(read_log_dir)
    data["task"] = {**data["task"], "params": params}
    data.update(
        name=f"bench-transformer-{mode}-seed{seed}",
        mode=MODES[mode],
        seed=seed,
        steps=steps,
        eval_interval=eval_interval,
        workers=WORKERS,
        batch_size=BATCH_PER_WORKER,
        resources=RESOURCES,
    )
    if delay_ms is not None:
        data["faults"] = [
            {
                "kind": "delay",
                "workers": [STRAGGLER],
                "distribution": "exponential",
                "delay_ms": delay_ms,
            }
        ]
    return data


def config_params() -> GPTParams:
    """The config's task params."""
    data = yaml.safe_load(CONFIG.read_text())
    return GPTParams.model_validate(data["task"]["params"])


def tokens_per_sample() -> int:
    """Bytes of context of the config's task (each sample trains that many tokens)."""
    return config_params().block_size


# -- throughput -------------------------------------------------------------------------


def run_plain(seed: int, steps: int) -> dict[str, Any]:
    """Plain PyTorch on the job's model, samples and global batch (every core)."""
    r = train_plain(PlainJob.model_validate(job("sync", seed, steps, steps + 1)))
    return {
        "steady_tokens_per_s": r.steady_tokens_per_s,
        "final_train_loss": r.train_losses[-1],
        "torch_threads": r.torch_threads,
    }


def run_throughput(mode: str, seed: int, steps: int) -> dict[str, Any]:
    """One job with the read log on; its steady tokens/s, consistency and memory."""
    with tempfile.TemporaryDirectory(prefix="esgd-reads-") as tmp:
        run = run_job(job(mode, seed, steps, steps + 1, read_log_dir=Path(tmp)))
        logs = read_log(Path(tmp))
    s = run.summary
    return {
        "steady_tokens_per_s": steady_rate(step_points(run)) * tokens_per_sample(),
        "timing": s["timing"],
        "b_hat_max": s["consistency"]["b_hat_max"],
        "b_hat_mean": s["consistency"]["b_hat_mean"],
        "bound": s["consistency"]["bound"],
        "memory": memory_report(logs, seed),
    }


def memory_report(logs: list[ProcessReads], seed: int) -> dict[str, Any]:
    """Per worker: peak RSS, windows read against its shard's, reads outside the shard."""
    task = GPTBytesTask(config_params())
    train = task.train_data(TaskContext(seed, 0, None, torch.device("cpu")))
    shards = make_shards(len(train), WORKERS, seed)
    window_bytes = train.block_size + 1
    workers: dict[str, dict[str, Any]] = {}
    for wid, shard in enumerate(shards):
        mine = [r for r in logs if r.who == f"w{wid}" and r.split == "train"]
        read = frozenset().union(*(r.indices for r in mine))
        outside = read - set(shard.tolist())
        rss = [r.peak_rss_kib for r in mine if r.peak_rss_kib is not None]
        workers[f"w{wid}"] = {
            "peak_rss_mib": max(rss) / 1024 if rss else None,
            "windows_read": len(read),
            "shard_windows": int(shard.size),
            "shard_bytes": int(shard.size) * window_bytes,
            "read_outside_shard": len(outside),
        }
    return {
        "workers": workers,
        # what a worker's dataset object holds (what a DataLoader process is sent)
        "dataset_object_bytes": len(pickle.dumps(train)),
        "train_stream_bytes": train.index.n_bytes,
        "only_own_shard": all(w["read_outside_shard"] == 0 for w in workers.values())
        and all(w["windows_read"] > 0 for w in workers.values()),
    }


def measure_throughput(repeats: int, steps: int, plain_only: bool) -> dict[str, Any]:
    """Plain PyTorch, sync and elastic, interleaved per repeat (so slow phases of a noisy
    machine spread over all of them)."""
    labels = [PLAIN] if plain_only else [PLAIN, *MODES]
    raw: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for rep in range(repeats):
        for label in labels:
            say(f"[transformer] throughput {label} repeat {rep + 1}/{repeats}")
            r = run_plain(rep, steps) if label == PLAIN else run_throughput(label, rep, steps)
            raw[label].append(r)
            say(f"    {fmt(r['steady_tokens_per_s'])} tokens/s")
    plain_median = median([r["steady_tokens_per_s"] for r in raw[PLAIN]])
    out: dict[str, Any] = {}
    for label, runs in raw.items():
        m = median([r["steady_tokens_per_s"] for r in runs])
        out[label] = {"median_tokens_per_s": m, "ratio_to_plain": m / plain_median, "runs": runs}
    return out


# -- straggler --------------------------------------------------------------------------


def mean_step_ms(run: Run) -> float:
    """Steady-state wall time per step (ms), from the run's step records."""
    (s_a, t_a, _), (s_b, t_b, _) = steady_window(step_points(run))
    return 1e3 * (t_b - t_a) / (s_b - s_a)


def time_to_loss(run: Run, target: float) -> tuple[float | None, int | None]:
    """Seconds from the first record to the first evaluation with validation loss <=
    ``target``, and its step (``None``: never)."""
    if not run.records:
        return None, None
    t_start = float(run.records[0]["wall_time"])
    for r in run.evals:
        loss = r.get("test_loss")
        if loss is not None and loss <= target:
            return float(r["wall_time"]) - t_start, int(r["step"])
    return None, None


def final_loss(run: Run) -> float:
    losses = [r["test_loss"] for r in run.evals if r.get("test_loss") is not None]
    return float(losses[-1]) if losses else math.nan


def measure_straggler(repeats: int, steps: int, eval_interval: int) -> dict[str, Any]:
    """The calibration run (the straggler's mean delay), then each mode with the
    straggler, ``repeats`` seeds; sync first in each seed (it sets the seed's target)."""
    say("[transformer] calibration: sync without faults, seed 0")
    cal = run_job(job("sync", 0, steps, eval_interval))
    delay_ms = mean_step_ms(cal)
    say(f"    step {delay_ms:.0f} ms -> delay_ms")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    targets: list[float] = []
    order = ["sync", *(m for m in MODES if m != "sync")]  # sync's final loss sets the target
    for seed in range(repeats):
        target = math.nan
        for mode in order:
            say(f"[transformer] straggler {mode} seed {seed}")
            run = run_job(job(mode, seed, steps, eval_interval, delay_ms=delay_ms))
            if mode == "sync":
                target = final_loss(run) * (1.0 + TARGET_SLACK)
                targets.append(target)
                say(f"    seed {seed}'s target validation loss {target:.4f}")
            t, step = time_to_loss(run, target)
            cons = run.summary["consistency"]
            runs[mode].append(
                {
                    "seed": seed,
                    "target_loss": target,
                    "time_to_target_s": t,
                    "step_at_target": step,
                    "final_loss": final_loss(run),
                    "mean_step_ms": mean_step_ms(run),
                    "b_hat_max": cons["b_hat_max"],
                    "b_hat_mean": cons["b_hat_mean"],
                    "bound": cons["bound"],
                }
            )
            say(f"    to target: {fmt(t, '.1f')} s (step {step})")
    modes: dict[str, Any] = {}
    for mode, rs in runs.items():
        values = [r["time_to_target_s"] for r in rs]
        modes[mode] = {"median_s": _median_or_none(values), "runs": rs}
    sync_s, el_s = modes["sync"]["median_s"], modes["elastic"]["median_s"]
    ratio = el_s / sync_s if sync_s and el_s is not None else None
    st_s = modes["straggler"]["median_s"] if "straggler" in modes else None
    st_ratio = st_s / sync_s if sync_s and st_s is not None else None
    return {
        "calibration": {
            "delay_ms": delay_ms,
            "final_loss": final_loss(cal),
            "wall_seconds": cal.summary["wall_seconds"],
        },
        "target_losses": targets,
        "modes": modes,
        "elastic_over_sync": ratio,
        "straggler_over_sync": st_ratio,
    }


def _median_or_none(values: Sequence[float | None]) -> float | None:
    """Median where a run that never reached the target counts as infinitely slow."""
    if not values:
        return None
    m = median([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else m


# -- report -----------------------------------------------------------------------------


def _verdict(ratio: float | None, target: float, at_least: bool) -> str:
    ok = ratio is not None and (ratio >= target if at_least else ratio <= target)
    return f"{fmt(ratio, '.2f')}x ({'met' if ok else 'missed'})"


def _throughput_rows(tp: dict[str, Any]) -> list[str]:
    lines = [
        "| run | tokens/s (steady, median) | x plain | all runs | B̂ max / bound |",
        "|---|---:|---:|---|---|",
    ]
    for label, agg in tp.items():
        runs = agg["runs"]
        b_hat = "; ".join(
            f"{fmt(r.get('b_hat_max'), '.3g')} / {fmt(r.get('bound'), '.3g')}" for r in runs
        )
        lines.append(
            f"| {label} | {fmt(agg['median_tokens_per_s'])} | {fmt(agg['ratio_to_plain'], '.2f')} "
            f"| {', '.join(fmt(r['steady_tokens_per_s']) for r in runs)} "
            f"| {b_hat if label != PLAIN else '-'} |"
        )
    return lines


def _memory_rows(tp: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| run | worker | peak RSS (MiB) | windows read / shard's | outside its shard |",
        "|---|---|---:|---|---:|",
    ]
    for label in MODES:
        if label not in tp:
            continue
        mem = tp[label]["runs"][0]["memory"]
        for wid, w in mem["workers"].items():
            lines.append(
                f"| {label} | {wid} | {fmt(w['peak_rss_mib'], '.0f')} "
                f"| {w['windows_read']:,} / {w['shard_windows']:,} | {w['read_outside_shard']} |"
            )
        lines += [
            "",
            f"A worker's dataset object (paths and offsets, what it holds of the corpus) "
            f"pickles to {mem['dataset_object_bytes']:,} bytes; its shard is "
            f"{next(iter(mem['workers'].values()))['shard_bytes']:,} bytes of the "
            f"{mem['train_stream_bytes']:,}-byte training stream.",
        ]
        break  # the first mode's first repeat stands for all (every run is checked)
    return lines


def _straggler_rows(st: dict[str, Any]) -> list[str]:
    cal = st["calibration"]
    targets = ", ".join(f"{t:.4f}" for t in st["target_losses"])
    lines = [
        "",
        f"Straggler: worker {STRAGGLER}, exponential delays with mean "
        f"**{cal['delay_ms']:.0f} ms** (a fault-free sync step, seed 0). Target validation "
        f"loss per seed: that seed's sync run's final x {1 + TARGET_SLACK:.2f} ({targets}).",
        "",
        "| mode | time to target (median) | all runs (s) | steps to target | step ms "
        "| final loss | B̂ mean / bound |",
        "|---|---:|---|---|---:|---|---|",
    ]
    for mode, agg in st["modes"].items():
        runs = agg["runs"]
        lines.append(
            f"| {mode} | {fmt(agg['median_s'], '.1f')} s "
            f"| {', '.join(fmt(r['time_to_target_s'], '.1f') for r in runs)} "
            f"| {', '.join(fmt(r['step_at_target'], 'd') for r in runs)} "
            f"| {fmt(median([r['mean_step_ms'] for r in runs]), '.0f')} "
            f"| {', '.join(fmt(r['final_loss'], '.4f') for r in runs)} "
            f"| {'; '.join(_b_hat_mean(r) for r in runs)} |"
        )
    return lines


def _b_hat_mean(r: dict[str, Any]) -> str:
    return f"{fmt(r['b_hat_mean'], '.3g')} / {fmt(r['bound'], '.3g')}"


def render(payload: dict[str, Any]) -> str:
    """The markdown block for ``docs/benchmarks.md``."""
    note = load_note(payload["load_before"])
    lines = run_header(payload, f"Median of {payload['repeats']} runs.")
    tp = payload["throughput"]
    lines += _throughput_rows(tp)
    verdicts = []
    if not payload["plain_only"]:
        lines += _memory_rows(tp)
        for mode, target in THROUGHPUT_TARGETS.items():
            verdicts.append(
                f"{mode} >= {target}x plain: {_verdict(tp[mode]['ratio_to_plain'], target, True)}"
            )
        st = payload["straggler"]
        lines += _straggler_rows(st)
        verdicts.append(
            f"elastic <= {STRAGGLER_TARGET}x sync's time to the target loss: "
            f"{_verdict(st['elastic_over_sync'], STRAGGLER_TARGET, False)}"
        )
        verdicts.append(
            "the straggler mode (no target of its own): "
            f"{fmt(st.get('straggler_over_sync'), '.2f')}x sync's time"
        )
        only_own = all(
            tp[m]["runs"][i]["memory"]["only_own_shard"]
            for m in MODES
            if m in tp  # results written before a mode was added lack it
            for i in range(len(tp[m]["runs"]))
        )
        verdicts.append(f"every worker read only its shard: {'yes' if only_own else 'NO'}")
    if verdicts:  # a plain-only smoke run has none
        lines += [
            "",
            "Targets: **" + "; ".join(verdicts) + "**." + (f" {NOT_A_VERDICT}" if note else ""),
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else NAME)
    parser.add_argument(
        "--plain-only", action="store_true", help="time only the plain PyTorch reference"
    )
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
    load_before = load_average()
    say(f"[transformer] load average {load_before} on {torch.get_num_threads()} torch threads")
    if not args.plain_only:
        init_ray()
    tp_steps = QUICK_THROUGHPUT_STEPS if args.quick else THROUGHPUT_STEPS
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine_info(command_line("bench.transformer", argv)),
        "quick": args.quick,
        "plain_only": args.plain_only,
        "repeats": repeats,
        "workers": WORKERS,
        "batch_per_worker": BATCH_PER_WORKER,
        "tokens_per_step": WORKERS * BATCH_PER_WORKER * tokens_per_sample(),
        "resources": RESOURCES,
        "throughput_steps": tp_steps,
        "load_before": load_before,
        "throughput": measure_throughput(repeats, tp_steps, args.plain_only),
    }
    if not args.plain_only:
        payload["straggler"] = measure_straggler(
            repeats,
            QUICK_STRAGGLER_STEPS if args.quick else STRAGGLER_STEPS,
            QUICK_EVAL_INTERVAL if args.quick else EVAL_INTERVAL,
        )
    payload["load_after"] = load_average()
    # a plain-only run is a smoke test: it never rewrites the doc's table
    return publish(NAME, payload, render(payload), args.quick or args.plain_only)


if __name__ == "__main__":
    sys.exit(main())
