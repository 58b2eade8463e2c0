"""Missing-gradient policies: mean B̂ of ``own`` against ``zero_fill`` under 20% drops.

The job is the drop drill (``configs/drills/drop_20pct.yaml``: digits, MLP [64], 4 workers,
sync mode, lr 0.1, momentum 0.9, every worker's gradient message lost with probability 0.2)
at batch 32 and 128 per worker, one seed per repeat (the seed fixes the split, the initial
weights, the samplers and the drop draws, so every policy of a seed loses as many messages
at the same steps; which worker's message it is follows the order the replies arrive in).
Sync mode: every bit of B̂ comes from the drops. B̂ is measured against the consistent
sequence (every gradient applied, lost ones included; docs/consistency.md, "Missing
gradients"), cumulatively: each view handed out, against ``x*`` of its iteration.

Run: ``python -m bench.missing_policies [--repeats N] [--quick]``.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from typing import Any

from bench.common import (
    REPO,
    base_parser,
    command_line,
    fmt,
    init_ray,
    load_average,
    machine_info,
    publish,
    run_header,
    run_job,
    say,
)
from service.drills.spec import load_drill

NAME = "missing_policies"
DEFAULT_REPEATS = 5
BATCHES = (32, 128)
# the claim under test is own against zero_fill; reaverage runs with --reaverage
POLICIES = ("zero_fill", "own")
QUICK_STEPS = 60
DRILL = REPO / "configs" / "drills" / "drop_20pct.yaml"


def job(policy: str, batch: int, seed: int, steps: int | None) -> dict[str, Any]:
    """The drop drill's job with one policy, batch and seed (no checkpoints: not measured)."""
    base = load_drill(DRILL).job.model_dump()
    base.update(
        name=f"missing-{policy}-b{batch}-s{seed}",
        missing_policy=policy,
        batch_size=batch,
        seed=seed,
        checkpoint={"interval_steps": None},
    )
    if steps is not None:
        base["steps"] = steps
    return base


def describe(summary: dict[str, Any]) -> dict[str, Any]:
    """What one run says about B̂ and the drops."""
    cons = summary["consistency"]
    return {
        "b_hat_mean": cons["b_hat_mean"],
        "b_hat_max": cons["b_hat_max"],
        "bound": cons["bound"],
        "views_measured": cons["views_measured"],
        "dropped_gradients": summary["dropped_gradients"],
        "steps_all_lost": summary["steps_all_lost"],
        "final_test_accuracy": summary["final_test_accuracy"],
    }


def measure(
    batches: Sequence[int], seeds: Sequence[int], steps: int | None, policies: Sequence[str]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every run: ``{batch: {policy: [one description per seed]}}`` (seeds interleaved)."""
    init_ray()
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for batch in batches:
        per = out.setdefault(str(batch), {p: [] for p in policies})
        for seed in seeds:
            for policy in policies:  # interleaved, so slow phases hit every policy
                r = describe(run_job(job(policy, batch, seed, steps)).summary)
                per[policy].append(r)
                say(
                    f"[{NAME}] batch {batch} seed {seed} {policy}: B̂ mean "
                    f"{r['b_hat_mean']:.4g} max {r['b_hat_max']:.4g}, "
                    f"dropped {r['dropped_gradients']}, all lost {r['steps_all_lost']}"
                )
    return out


def verdicts(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per batch: mean over seeds of each policy's mean B̂, and own < zero_fill per seed."""
    out: dict[str, dict[str, Any]] = {}
    for batch, per in runs.items():
        means = {p: statistics.fmean(r["b_hat_mean"] for r in rs) for p, rs in per.items()}
        pairs = zip(per["own"], per["zero_fill"], strict=True)
        wins = sum(o["b_hat_mean"] < z["b_hat_mean"] for o, z in pairs)
        out[batch] = {
            "mean_b_hat_mean": means,
            "own_below_zero_fill_seeds": wins,
            "seeds": len(per["own"]),
            "own_below_zero_fill": means["own"] < means["zero_fill"],
        }
    return out


def table(payload: dict[str, Any]) -> str:
    lines = run_header(payload, f"{payload['repeats']} seeds per row {payload['seeds']}.")
    lines += [
        "| batch | policy | B̂ mean, per seed | mean | B̂ max, per seed | dropped | all lost |",
        "|---:|---|---|---:|---|---:|---:|",
    ]
    for batch, per in payload["runs"].items():
        for policy, rs in per.items():
            means = ", ".join(fmt(r["b_hat_mean"], ".3f") for r in rs)
            maxes = ", ".join(fmt(r["b_hat_max"], ".2f") for r in rs)
            avg = payload["verdicts"][batch]["mean_b_hat_mean"][policy]
            dropped = sum(r["dropped_gradients"] for r in rs)
            all_lost = sum(r["steps_all_lost"] for r in rs)
            lines.append(
                f"| {batch} | {policy} | {means} | {avg:.3f} | {maxes} | {dropped} | {all_lost} |"
            )
    lines.append("")
    for batch, v in payload["verdicts"].items():
        m = v["mean_b_hat_mean"]
        word = "smaller" if v["own_below_zero_fill"] else "**not smaller**"
        rea = f" (reaverage {m['reaverage']:.3f})" if "reaverage" in m else ""
        lines.append(
            f"Batch {batch}: own's mean B̂ {m['own']:.3f} is {word} than zero_fill's "
            f"{m['zero_fill']:.3f}{rea}; own below zero_fill in "
            f"{v['own_below_zero_fill_seeds']} of {v['seeds']} seeds."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else NAME)
    parser.add_argument("--reaverage", action="store_true", help="run reaverage too")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
    seeds = list(range(repeats))
    steps = QUICK_STEPS if args.quick else None
    load_before = load_average()
    say(f"[{NAME}] load average {load_before}")
    policies = (*POLICIES, "reaverage") if args.reaverage else POLICIES
    runs = measure(BATCHES, seeds, steps, policies)
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine_info(command_line(f"bench.{NAME}", argv)),
        "quick": args.quick,
        "repeats": repeats,
        "seeds": seeds,
        "steps": steps or load_drill(DRILL).job.steps,
        "drill": str(DRILL.relative_to(REPO)),
        "load_before": load_before,
        "runs": runs,
        "verdicts": verdicts(runs),
    }
    payload["load_after"] = load_average()
    return publish(NAME, payload, table(payload), args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
