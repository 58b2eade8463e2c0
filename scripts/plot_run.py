"""Fetch a finished job from the service over HTTP and leave its summary and a plot.

``python scripts/plot_run.py JOB_ID --out runs/demo [--url URL] [--token TOKEN]`` writes:

* ``summary.json``: the job as ``GET /jobs/{id}`` returns it (state, spec, the runtime's
  summary: accuracy, throughput, B̂ against its bound, recoveries, checkpoints);
* ``metrics.jsonl`` and ``events.json``: every metric record and event of the job;
* ``plot.png``: training loss, test accuracy and B̂ (with its analytic bound) over the job's
  time, every injected fault drawn as a labelled vertical line
  (:func:`service.drills.plot.plot_run`, the drills' own plot, from the runtime's
  typed events in the job's summary);

then prints a few lines: where the files are, and the numbers that matter.

Exit codes: 0 written, 2 the service refused or could not be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

# Largest page the API gives (``limit`` of /metrics and /events).
PAGE = 10_000


def fetch_all(client: httpx.Client, path: str, cursor: str, last: str) -> list[dict[str, Any]]:
    """Every item of a paged route, following its cursor (``after_seq`` / ``after_id``)."""
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": PAGE}
    while True:
        r = client.get(path, params=params)
        r.raise_for_status()
        page = r.json()
        items += page["items"]
        if len(page["items"]) < PAGE or page[last] is None:
            return items
        params[cursor] = page[last]


def fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("job_id", help="the job's id (GET /jobs lists them)")
    p.add_argument("--out", type=Path, required=True, help="folder for the files")
    p.add_argument("--url", default=os.environ.get("ESGD_URL", "http://127.0.0.1:8000"))
    p.add_argument("--token", default=os.environ.get("ESGD_TOKEN"), help="bearer token")
    args = p.parse_args(argv)

    from core.events import Event, Record, record_from_dict
    from service.drills.plot import plot_run  # matplotlib's Figure (no pyplot, no GUI backend)

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=60) as client:
            r = client.get(f"/jobs/{args.job_id}")
            r.raise_for_status()
            job: dict[str, Any] = r.json()
            records = fetch_all(client, f"/jobs/{args.job_id}/metrics", "after_seq", "last_seq")
            events = fetch_all(client, f"/jobs/{args.job_id}/events", "after_id", "last_id")
    except httpx.HTTPError as exc:
        print(f"error: cannot read job {args.job_id} from {args.url}: {exc}", file=sys.stderr)
        return 2

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(job, indent=2) + "\n")
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (out / "events.json").write_text(json.dumps(events, indent=2) + "\n")
    plot = out / "plot.png"
    title = f"{job['name']} ({job['id']}): {job['state']}"
    typed: list[Record] = []
    for rec in records:
        with contextlib.suppress(KeyError, TypeError, ValueError):  # a record without times
            typed.append(record_from_dict(rec))
    # the runtime's own events carry each fault's kind (the /events page is for people)
    runtime_events = [Event.from_dict(e) for e in (job.get("summary") or {}).get("events") or []]
    drawn = plot_run(typed, runtime_events, plot, title=title)

    s = job.get("summary") or {}
    cons = s.get("consistency") or {}
    faults = [e for e in events if e["kind"] == "fault"]
    print(f"job {job['id']} ({job['name']}): {job['state']}, {job['step']} steps")
    print(
        f"  final test accuracy {fmt(s.get('final_test_accuracy'), '.4f')}, "
        f"{fmt(s.get('samples_per_s'), '.0f')} samples/s, "
        f"B̂ max {fmt(cons.get('b_hat_max'), '.3g')} "
        f"(analytic bound {fmt(cons.get('bound'), '.3g')})"
    )
    print(f"  {len(faults)} fault events, recovery (s): {s.get('recovery_s') or '-'}")
    print(f"  summary: {out / 'summary.json'}")
    print(f"  metrics: {out / 'metrics.jsonl'} ({len(records)} records)")
    print(f"  events:  {out / 'events.json'} ({len(events)} events)")
    print(f"  plot:    {plot}" if drawn else "  plot:    none (the job has no metric records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
