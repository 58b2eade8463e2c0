"""The dashboard in a real headless browser (Debian's chromium driven by Playwright).

It must list a job, draw its charts, and keep updating them while the job runs, using
nothing but the service itself (no request leaves for the internet). A screenshot is
written to the test's tmp dir and copied to docs/img/dashboard.png.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SMALL_SPEC, Server, wait_for

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

# Pixels of a series' colour in a chart (the loss line is #2563eb), counted in the page.
COUNT_LINE_PIXELS = """([id, r, g, b]) => {
  const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (Math.abs(d[i] - r) < 40 && Math.abs(d[i + 1] - g) < 40 && Math.abs(d[i + 2] - b) < 40
        && d[i + 3] > 100) n++;
  return n;
}"""


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="apt-get install -y chromium")
def test_dashboard_lists_a_job_and_draws_live_charts(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    srv = make_server()
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
