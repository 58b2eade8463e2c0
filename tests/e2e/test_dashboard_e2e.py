"""The dashboard in a real headless browser (Debian's chromium driven by Playwright).

It must list a job, draw its charts, and keep updating them while the job runs, using
nothing but the service itself (no request leaves for the internet). A screenshot is
written to the test's tmp dir and copied to docs/img/dashboard.png. A finished job of
100,000 steps must load as fast: its history in one request, thinned on the server
(docs/img/dashboard-100k.png).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SMALL_SPEC, Server, wait_for

from core.events import EvalRecord, Event, EventKind, Record, StepRecord
from service.store import Store, new_id

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A straggler (worker 0, exponential delays with a 30 ms mean) keeps the job running long
# enough to watch it move (600 steps x ~30 ms), and makes B-hat > 0 in elastic mode.
SPEC: dict[str, Any] = {
    **SMALL_SPEC,
    "name": "dashboard-demo",
    "steps": 600,
    "eval_interval": 10,
    "mode": {"name": "elastic", "beta": 0.5},
    "faults": [{"kind": "delay", "delay_ms": 30.0}],
}

# Pixels of a series' colour in a chart (the loss line is #2563eb), counted in the page on
# the canvas uPlot draws in the chart's container.
COUNT_LINE_PIXELS = """([id, r, g, b]) => {
  const c = document.getElementById(id).querySelector('canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (Math.abs(d[i] - r) < 40 && Math.abs(d[i + 1] - g) < 40 && Math.abs(d[i + 2] - b) < 40
        && d[i + 3] > 100) n++;
  return n;
}"""


BIG_STEPS = 100_000


@pytest.fixture(scope="module")
def big_job_and_server(
    make_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Server]:
    """One server for the module (a start imports torch: seconds), started on a state
    directory that already holds a finished job of :data:`BIG_STEPS` steps."""
    state_dir = tmp_path_factory.mktemp("dashboard") / "state"
    job_id = store_a_finished_job(state_dir, BIG_STEPS)
    return job_id, make_server(state_dir=state_dir)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="apt-get install -y chromium")
def test_dashboard_lists_a_job_and_draws_live_charts(
    big_job_and_server: tuple[str, Server], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    _, srv = big_job_and_server
    client = srv.client()
    job = client.post("/jobs", json=SPEC).json()
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(srv.url + "/")
            row = page.locator(f'#jobs tbody tr[data-job-id="{job["id"]}"]')
            row.wait_for(timeout=30_000)
            assert "dashboard-demo" in row.inner_text()
            row.click()
            page.wait_for_function(
                "() => ['running'].includes(document.querySelector('#job-state').textContent)",
                timeout=150_000,
            )
            # charts draw: points for loss and accuracy, and the line is on the canvas
            page.wait_for_function(
                "() => +document.querySelector('#chart-loss').dataset.points > 5 &&"
                " +document.querySelector('#chart-acc').dataset.points > 0 &&"
                " +document.querySelector('#chart-bhat').dataset.points > 5",
                timeout=60_000,
            )
            first = int(page.locator("#chart-loss").get_attribute("data-points") or 0)
            first_step = page.locator("#job-stats").inner_text()
            assert page.evaluate(COUNT_LINE_PIXELS, ["chart-loss", 37, 99, 235]) > 50
            # ... and keep updating while the job runs
            page.wait_for_function(
                f"() => +document.querySelector('#chart-loss').dataset.points > {first + 20}",
                timeout=60_000,
            )
            assert page.locator("#job-stats").inner_text() != first_step
            assert page.locator("#workers tbody tr").count() == 2
            assert page.locator("#events li").count() >= 3
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            # let it finish: the page shows the end state
            page.wait_for_function(
                "() => document.querySelector('#job-state').textContent === 'succeeded'",
                timeout=120_000,
            )
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, REPO / "docs" / "img" / "dashboard.png")
    assert errors == []
    outside = [u for u in requests if not u.startswith(srv.url)]
    assert outside == [], outside  # everything comes from the service itself
    wait_for(lambda: client.get(f"/jobs/{job['id']}").json()["terminal"], 30, what="the job to end")


def store_a_finished_job(state_dir: Path, steps: int) -> str:
    """A job of ``steps`` steps that has succeeded, written into a service's state directory
    the way the service writes one (Store.ingest of typed records), before it starts."""
    store = Store(state_dir / "elastic-sgd.sqlite3")
    job_id = new_id()
    store.create_job(job_id, "long-run", {"name": "long-run"}, state_dir / "runs" / job_id)
    store.transition(job_id, "pending", "running", detail="started", started=True)
    seq, batch = 0, list[Record]()
    for step in range(1, steps + 1):
        seq += 1
        batch.append(
            StepRecord(seq, step, 0.01 * step, 1e9 + 0.01 * step, 2.0 / (1 + step / 1000), 900.0,
                       32 * step, 0.1 + 0.02 * (step % 7), 0.25, 1.0, 4)
        )  # fmt: skip
        if step % 100 == 0:  # an evaluation every 100 steps: 1,000 of them
            seq += 1
            acc: dict[str, float | None] = {"test_accuracy": 1 - 0.9 / (1 + step / 5000)}
            batch.append(EvalRecord(seq, step, 0.01 * step, 1e9 + 0.01 * step, 4, acc))
        if len(batch) >= 10_000:
            store.ingest(job_id, batch, [])
            batch = []
    done = Event(seq + 1, 1e9 + 0.01 * steps, 0.01 * steps, steps, EventKind.CHECKPOINT, "last")
    # the guard's story, early in the run (far outside the latest events the history holds):
    # the warm-up ends at step 20 (the bound is frozen), a warning at 30,000, a tightening
    # at 60,000; 300 checkpoint events after them push them out of the latest 200
    marks = [
        Event(seq + 2, 1e9, 0.2, 20, EventKind.BOUND, "bound frozen: 1.0"),
        Event(seq + 3, 1e9 + 300, 300.0, 30_000, EventKind.GUARD, "out of bound", guard="warn"),
        Event(seq + 4, 1e9 + 600, 600.0, 60_000, EventKind.GUARD, "tightened", guard="tighten"),
    ]
    later = [
        Event(seq + 10 + i, 1e9 + 700 + i, 700.0 + i, 70_000 + i, EventKind.CHECKPOINT, "c")
        for i in range(300)
    ]
    store.ingest(job_id, batch, [done, *marks, *later])
    workers = [{"id": i, "state": "left", "step": steps} for i in range(4)]
    status: dict[str, Any] = {"workers": workers, "b_hat_max": 0.25, "b_hat_mean": 0.16}
    status["bound"] = 1.0
    store.update_progress(job_id, step=steps, total_steps=steps, status=status)
    store.transition(job_id, "running", "succeeded", detail="done", step=steps, finished=True)
    store.close()
    return job_id


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="apt-get install -y chromium")
def test_dashboard_draws_a_finished_job_of_100k_steps(
    big_job_and_server: tuple[str, Server], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    job_id, srv = big_job_and_server
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            t0 = time.monotonic()
            page.goto(f"{srv.url}/#job={job_id}")
            # the page's numbers show the last step, and every chart holds the whole run
            page.wait_for_function(
                "() => document.querySelector('#job-state').textContent === 'succeeded'"
                f" && document.querySelector('#job-stats').innerText.includes('{BIG_STEPS}')",
                timeout=30_000,
            )
            page.wait_for_function(
                "() => ['loss', 'acc', 'bhat'].every(c =>"
                " +document.querySelector('#chart-' + c).dataset.points >= 900 &&"
                " +document.querySelector('#chart-' + c).dataset.drawn > 0)",
                timeout=30_000,
            )
            loaded_s = time.monotonic() - t0
            points = {
                c: int(page.locator(f"#chart-{c}").get_attribute("data-points") or 0)
                for c in ("loss", "acc", "bhat")
            }
            assert page.evaluate(COUNT_LINE_PIXELS, ["chart-loss", 37, 99, 235]) > 50
            stats = page.locator("#job-stats").inner_text()
            # the x axis reaches the last step: the latest record is always kept
            x_max = page.evaluate("() => charts.loss.u.scales.x.max")
            # the B-hat chart marks the frozen bound and both guard actions, in their colours
            page.wait_for_function(
                "() => +document.querySelector('#chart-bhat').dataset.marks === 3", timeout=10_000
            )
            tighten_px = page.evaluate(COUNT_LINE_PIXELS, ["chart-bhat", 37, 99, 235])
            warn_px = page.evaluate(COUNT_LINE_PIXELS, ["chart-bhat", 217, 119, 6])
            page.wait_for_function("() => document.querySelector('#events li') !== null")
            shot = tmp_path / "dashboard-100k.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert f"{BIG_STEPS} / {BIG_STEPS}" in stats
    assert tighten_px > 30 and warn_px > 30, (tighten_px, warn_px)
    assert x_max == BIG_STEPS
    # thinned on the server: about 2,000 points per series, not 100,000
    assert 1_000 <= points["loss"] <= 2_000 and 900 <= points["acc"] <= 1_000, points
    assert loaded_s < 20, loaded_s  # the history comes in one request
    assert sum("/history" in u for u in requests) == 1
    outside = [u for u in requests if not u.startswith(srv.url)]
    assert outside == [], outside
    assert shot.stat().st_size > 10_000
    (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, REPO / "docs" / "img" / "dashboard-100k.png")
