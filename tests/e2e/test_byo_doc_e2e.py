"""The README's "Bring your own task" section runs as written: its Python block is
saved as the module it names, its YAML block is the job, its shell block's settings start a
real server (the module allowed by ESGD_TASK_MODULES, its folder shipped to the actors as
Ray's working_dir), and the job submitted over HTTP reaches the accuracy the page's task is
for; the task stays under 40 lines."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, Server, job_in, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

README = REPO / "README.md"


def _section() -> str:
    """The README's "Bring your own task" section (up to the next ``## `` heading)."""
    text = README.read_text()
    start = text.index("## Bring your own task\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", _section(), flags=re.S | re.M)


def test_the_task_section_comes_right_after_the_two_commands() -> None:
    headings = re.findall(r"^## (.+)$", README.read_text(), flags=re.M)
    assert headings[0] == "Bring your own task", headings


def test_the_page_s_task_is_complete_and_short() -> None:
    (code,) = _blocks("python")
    assert len(code.splitlines()) < 40
    assert "class " in code and "def loss" in code and "def build_model" in code


def test_the_page_s_task_trains_through_the_service_as_written(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    (code,) = _blocks("python")
    (job_yaml,) = _blocks("yaml")
    (sh,) = _blocks("sh")
    module = re.search(r"`(\w+)\.py`", _section())
    assert module is not None
    (tmp_path / f"{module.group(1)}.py").write_text(code)
    serve = next(line for line in sh.splitlines() if "serve" in line)
    env = {
        k: v.replace("$PWD", str(tmp_path))
        for k, _, v in (w.partition("=") for w in shlex.split(serve) if w.startswith("ESGD_"))
    }
    assert set(env) == {"ESGD_TASK_MODULES", "ESGD_RUNTIME_ENV_WORKING_DIR"}
    server = make_server(**env)
    spec: dict[str, Any] = yaml.safe_load(job_yaml)
    with server.client() as client:
        r = client.post("/jobs", json=spec)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = wait_for(
            lambda: job_in(client, job_id, {"succeeded", "failed", "cancelled"}),
            180,
            what="the page's job to end",
        )
        assert job["state"] == "succeeded", job.get("error")
        items = client.get(f"/jobs/{job_id}/metrics").json()["items"]
        last = [m for m in items if m["kind"] == "eval"][-1]
        assert last["test_accuracy"] >= 0.9, last
