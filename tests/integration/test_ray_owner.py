"""An embedded Ray outlives the thread that connected it (service.ray_conn's owner thread).

Ray starts its GCS and raylet with kernel fate-sharing (``PR_SET_PDEATHSIG``): they are
killed when the *thread* that ran ``ray.init`` ends. The service connects from a pool
thread (start-up's ``run_in_threadpool``), and anyio ends pool threads that sat idle for
10 s: under bench.load, a ``GET /metrics`` after the stream window pruned that thread and
the embedded Ray died with it (every job restarted). The script below runs in a process of
its own (its own Ray): first the control, a bare ``ray.init`` on a thread that then ends,
whose GCS must be gone (the mechanism this guards against; if Ray ever stops doing this the
control fails and says so); then :func:`service.ray_conn.connect` on such a thread, whose
GCS must still answer, and a task must run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]

# one process per case (each its own Ray); "{how}" is the case
SCRIPT = """
import json, os, threading, time
import ray
from service import ray_conn

start = {{
    "bare": lambda: ray.init(address="local", num_cpus=1, include_dashboard=False),
    "connect": lambda: ray_conn.connect(None, num_cpus=1),
}}["{how}"]
t = threading.Thread(target=start)
t.start()
t.join()  # the thread that started Ray has ended
time.sleep(1.0)  # the kernel's SIGKILL of its processes is immediate; give it a moment
out = {{"gcs": str(ray_conn.gcs_reachable())}}
if out["gcs"] == "up":
    out["task"] = ray.get(ray.remote(lambda: 6 * 7).remote(), timeout=60)
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)  # no ray.shutdown(): with a dead GCS it waits for seconds
"""


def run_case(how: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ESGD_RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT.format(how=how)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # what it started goes with its group (below)
    )


def result(proc: subprocess.Popen[str]) -> dict[str, object]:
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stdout[-2000:] + stderr[-3000:]
    out: dict[str, object] = json.loads(lines[-1].removeprefix("RESULT "))
    return out


def test_embedded_ray_survives_the_connecting_thread() -> None:
    bare, connected = run_case("bare"), run_case("connect")  # side by side
    # the control: Ray's processes end with the thread that started them
    assert result(bare) == {"gcs": "refused"}
    # through the project's connector they live on the owner thread
    assert result(connected) == {"gcs": "up", "task": 42}
