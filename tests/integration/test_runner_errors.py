"""What a caller of JobRunner sees when the coordinator raises, on the session's real Ray.

The same errors are built in-process in ``tests/unit/test_ray_errors.py``; here Ray itself
makes them: a coordinator whose constructor raises (an ``npz`` file that is not there), and
a refusal raised by a running coordinator's method (a scale past ``max_workers``).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from integration_helpers import config

from core.errors import InvalidRequest, TrainingFailed
from service.runner import JobRunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _assert_one_clean_line(message: str) -> None:
    assert "\x1b" not in message and "\n" not in message
    assert "Traceback" not in message and 'File "' not in message and "pid=" not in message


def test_a_coordinator_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    spec = config(
        "digits_elastic.yaml",
        dataset={"name": "npz", "path": "absent.npz"},
        workers=2,
        max_workers=2,
        steps=10,
    )
    runner = JobRunner(
        f"err-{uuid.uuid4().hex[:8]}", spec, tmp_path / "out", data_dir=tmp_path, detached=False
    )
    try:
        with pytest.raises(TrainingFailed) as ei:
            runner.start()
    finally:
        runner.release()
    message = str(ei.value)
    assert message.startswith(
        "the coordinator could not start: its constructor raised DatasetError: "
        "dataset.path 'absent.npz': no such file in the data directory"
    ), message
    _assert_one_clean_line(message)


def test_a_refusal_inside_the_coordinator_reaches_the_caller_as_it_was(tmp_path: Path) -> None:
    spec = config("digits_elastic.yaml", workers=2, max_workers=3, steps=100_000)
    runner = JobRunner(f"err-{uuid.uuid4().hex[:8]}", spec, tmp_path / "out", detached=False)
    try:
        runner.start()
        with pytest.raises(InvalidRequest) as ei:
            runner.scale(9)
        runner.cancel()
    finally:
        runner.release()
    assert type(ei.value) is InvalidRequest  # the coordinator's own error, not Ray's wrapper
    assert str(ei.value) == (
        "scale: n=9 is outside [min_workers=1, max_workers=3]; set max_workers in the job "
        "spec to allow more"
    )
