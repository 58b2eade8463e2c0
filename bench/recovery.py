"""Recovery: how fast training goes on after a worker dies, and after the coordinator dies.

Worker: digits, MLP [64], 4 workers, batch 32 each; workers 1, 2 and 3 are SIGKILLed (an
injected ``crash`` fault: the process really dies) at steps 60, 140 and 220 of a 300-step
run, and each is replaced. The runtime times every crash from the kill: ``detected_after_s``
(the coordinator learns of the death, from Ray's actor-death notification),
``next_update_after_s`` (the first update applied after it: the issue's number, target
< 1 s) and ``rejoined_after_s`` (the replacement joined). Both step modes are measured: in
``sync`` the step in flight waits for the dead worker until it is detected; in ``elastic``
the others may already be up to ``max_lag`` steps ahead.

Coordinator: the same job (elastic) with a checkpoint every 50 steps and a
``coordinator_crash`` at step 170 (the coordinator SIGKILLs its own process); Ray restarts
it and it resumes from the checkpoint of step 150. Measured from the crash's fault event
to the restart event (the new incarnation has loaded the checkpoint) and to the first step
record after the crash in ``metrics.jsonl`` (training resumed: target < 10 s), with the
steps lost (done again since the checkpoint: ~20 here; the crash fires at the first check
at or after step 170).

Run: ``python -m bench.recovery [--repeats N] [--quick]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from bench.common import (
    Run,
    base_parser,
    command_line,
    fmt,
    init_ray,
    load_average,
    machine_info,
    median,
    publish,
    run_header,
    run_job,
    say,
)
from core.events import Event, record_from_dict
from service.drills.analyse import coordinator_recoveries

NAME = "recovery"
DEFAULT_REPEATS = 3
# The issue's targets.
TARGET_WORKER_S = 1.0  # a worker's death -> the next applied update
TARGET_COORDINATOR_S = 10.0  # the coordinator's death -> training resumed
CRASHES = [(1, 60), (2, 140), (3, 220)]  # (worker, step): well apart, all before the end
STEPS = 300  # ~27 epochs of digits' 1437 training rows at 4 x 32 samples per step
CHECKPOINT_EVERY = 50
COORDINATOR_CRASH_STEP = 170  # 20 steps after the checkpoint of step 150
QUICK_STEPS = 240
MODES: dict[str, dict[str, Any]] = {
    "sync": {"name": "sync"},
    "elastic": {"name": "elastic", "beta": 0.5, "max_lag": 2},
}

SECTION = f"""## Recovery

What: seconds from a worker's death to the next update applied to the model (target
< {TARGET_WORKER_S:g} s), and from the coordinator's death to training resumed (target
< {TARGET_COORDINATOR_S:g} s on this machine), with the steps lost.

How: digits, MLP [64], 4 workers. Worker: in each {STEPS}-step run workers 1, 2 and 3 are
SIGKILLed (injected `crash` faults) at steps 60, 140 and 220 and replaced; the times come
from the runtime's `recoveries` in `summary.json`, measured from the kill. The job goes on
with the others at once; a replacement (a new process) joins only if it has started
before the run ends, which the last column counts. Coordinator: a `coordinator_crash` at
step {COORDINATOR_CRASH_STEP} with a checkpoint every {CHECKPOINT_EVERY} steps; from the
crash's fault event to the restart event and to the first step record after it in
`metrics.jsonl`; steps lost = the crash step minus the checkpoint's.

Command: `.venv/bin/python -m bench.recovery` (add `--repeats N`; `--quick` is a smoke
test that writes `bench/results/recovery-quick.json` and leaves this page alone).

<!-- {NAME}:begin -->
_not run yet_
<!-- {NAME}:end -->
"""


def base_job(name: str, seed: int, steps: int) -> dict[str, Any]:
    """digits, MLP [64], 4 workers x batch 32 (the drills' job)."""
    return {
        "name": name,
        "model": {"name": "mlp", "hidden": [64]},
        "dataset": {"name": "digits"},
        "batch_size": 32,
        "steps": steps,
        "workers": 4,
        "optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0001},
        "eval_interval": 25,
        "seed": seed,
    }


def worker_job(mode: str, seed: int, steps: int) -> dict[str, Any]:
    data = base_job(f"recovery-worker-{mode}-seed{seed}", seed, steps)
    data["mode"] = MODES[mode]
    data["faults"] = [
        {"kind": "crash", "workers": [w], "at_step": s} for w, s in CRASHES if s < steps
    ]
    return data


def coordinator_job(seed: int, steps: int) -> dict[str, Any]:
    data = base_job(f"recovery-coordinator-seed{seed}", seed, steps)
    data["mode"] = MODES["elastic"]
    data["checkpoint"] = {"interval_steps": CHECKPOINT_EVERY}
    data["faults"] = [{"kind": "coordinator_crash", "at_step": COORDINATOR_CRASH_STEP}]
    return data


def worker_samples(mode: str, seed: int, run: Run) -> list[dict[str, Any]]:
    """One entry per crashed worker, from the runtime's recoveries."""
    return [
        {
            "mode": mode,
            "seed": seed,
            "worker": r["worker"],
            "detected_after_s": r.get("detected_after_s"),
            "next_update_after_s": r.get("next_update_after_s"),
            "rejoined_after_s": r.get("rejoined_after_s"),
        }
        for r in run.summary["recoveries"]
        if r.get("kind") == "crash"
    ]


def coordinator_sample(seed: int, run: Run) -> dict[str, Any]:
    """The coordinator crash of one run (from its events and metrics records)."""
    records = sorted((record_from_dict(r) for r in run.records), key=lambda r: (r.wall_time, r.seq))
    events = [Event.from_dict(e) for e in run.summary["events"]]
    (crash,) = coordinator_recoveries(events, records)
    return {
        "seed": seed,
        **crash.to_dict(),
        "steps_lost_summary": run.summary["steps_lost"],
        "restarts": run.summary["restarts"],
        "final_test_accuracy": run.summary["final_test_accuracy"],
    }


def _values(samples: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(s[key]) for s in samples if s.get(key) is not None]


def _med_max(values: Sequence[float], spec: str = ".3f") -> str:
    return f"{fmt(median(values), spec)} / {fmt(max(values, default=None), spec)}"


def render(payload: dict[str, Any]) -> str:
    """The markdown block for ``docs/benchmarks.md``."""
    lines = run_header(payload, f"{payload['repeats']} runs per row (seeds {payload['seeds']}).")
    lines += [
        f"Worker death -> next applied update (target < {TARGET_WORKER_S:g} s); "
        "median / max over every crash:",
        "",
        "| mode | crashes | detected after (s) | next update after (s) | replacement joined "
        "before the end | target |",
        "|---|---:|---|---|---|---|",
    ]
    for mode, agg in payload["worker"].items():
        s = agg["samples"]
        nxt = _values(s, "next_update_after_s")
        joined = _values(s, "rejoined_after_s")
        lines.append(
            f"| {mode} | {len(s)} | {_med_max(_values(s, 'detected_after_s'))} "
            f"| {_med_max(nxt)} | {len(joined)} of {len(s)}"
            + (f" (median {median(joined):.1f} s)" if joined else "")
            + f" | {'met' if agg['met'] else 'missed'} |"
        )
    c = payload["coordinator"]
    lines += [
        "",
        f"Coordinator death -> training resumed (target < {TARGET_COORDINATOR_S:g} s), "
        f"checkpoint every {CHECKPOINT_EVERY} steps, crash at step {COORDINATOR_CRASH_STEP}:",
        "",
        "| seed | restarted after (s) | training resumed after (s) | resumed at step "
        "| steps lost | final accuracy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in c["samples"]:
        lines.append(
            f"| {r['seed']} | {fmt(r['restarted_after_s'], '.2f')} "
            f"| {fmt(r['resume_after_s'], '.2f')} | {fmt(r['resumed_step'], 'd')} "
            f"| {fmt(r['steps_lost'], 'd')} | {fmt(r['final_test_accuracy'], '.3f')} |"
        )
    w_worst = max((a["max_next_update_s"] or 0.0 for a in payload["worker"].values()), default=0)
    lines += [
        "",
        f"Targets: worker death -> next update max {w_worst:.3f} s "
        f"(**{'met' if all(a['met'] for a in payload['worker'].values()) else 'missed'}**, "
        f"< {TARGET_WORKER_S:g} s); coordinator death -> training resumed median "
        f"{fmt(c['median_resume_s'], '.2f')} s, max {fmt(c['max_resume_s'], '.2f')} s "
        f"(**{'met' if c['met'] else 'missed'}**, < {TARGET_COORDINATOR_S:g} s), "
        f"{fmt(c['median_steps_lost'], '.0f')} steps lost (the steps since the last "
        "checkpoint).",
    ]
    return "\n".join(lines)


def ensure_section() -> None:
    """Add this benchmark's section to docs/benchmarks.md if it has none (the rest of the
    file belongs to the other benchmarks and is left as it is)."""
    from bench.common import DOC, DOC_TEMPLATE

    text = DOC.read_text() if DOC.exists() else DOC_TEMPLATE
    if f"<!-- {NAME}:begin -->" not in text:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text.rstrip("\n") + "\n\n" + SECTION)


def main(argv: Sequence[str] | None = None) -> int:
    args = base_parser(__doc__.splitlines()[0] if __doc__ else NAME).parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
    steps = QUICK_STEPS if args.quick else STEPS
    seeds = list(range(repeats))
    load_before = load_average()
    say(f"[recovery] load average {load_before}")
    init_ray()

    worker: dict[str, dict[str, Any]] = {mode: {"samples": []} for mode in MODES}
    coordinator: list[dict[str, Any]] = []
    for seed in seeds:
        for mode in MODES:  # interleaved, so slow phases of the machine hit every kind
            say(f"[recovery] worker crashes, {mode}, seed {seed}")
            samples = worker_samples(mode, seed, run_job(worker_job(mode, seed, steps)))
            worker[mode]["samples"] += samples
            say(
                "    next update after "
                + ", ".join(fmt(s["next_update_after_s"], ".3f") for s in samples)
            )
        say(f"[recovery] coordinator crash, seed {seed}")
        coordinator.append(coordinator_sample(seed, run_job(coordinator_job(seed, steps))))
        c = coordinator[-1]
        say(f"    resumed after {fmt(c['resume_after_s'], '.2f')} s, {c['steps_lost']} steps lost")

    for agg in worker.values():
        nxt = _values(agg["samples"], "next_update_after_s")
        agg["median_next_update_s"] = median(nxt) if nxt else None
        agg["max_next_update_s"] = max(nxt, default=None)
        # every crash recovered, each within the target
        agg["met"] = len(nxt) == len(agg["samples"]) > 0 and max(nxt) < TARGET_WORKER_S
    resume = _values(coordinator, "resume_after_s")
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine_info(command_line("bench.recovery", argv)),
        "quick": args.quick,
        "repeats": repeats,
        "seeds": seeds,
        "steps": steps,
        "crashes": [{"worker": w, "at_step": s} for w, s in CRASHES if s < steps],
        "targets_s": {"worker": TARGET_WORKER_S, "coordinator": TARGET_COORDINATOR_S},
        "load_before": load_before,
        "worker": worker,
        "coordinator": {
            "checkpoint_every": CHECKPOINT_EVERY,
            "crash_step": COORDINATOR_CRASH_STEP,
            "samples": coordinator,
            "median_resume_s": median(resume) if resume else None,
            "max_resume_s": max(resume, default=None),
            "median_steps_lost": median(_values(coordinator, "steps_lost")),
            "met": len(resume) == len(coordinator) > 0 and max(resume) < TARGET_COORDINATOR_S,
        },
    }
    payload["load_after"] = load_average()
    return publish(NAME, payload, render(payload), args.quick, before_doc=ensure_section)


if __name__ == "__main__":
    sys.exit(main())
