"""What a drill is: a job with a fault plan, and the criteria it must meet at its end.

A drill file (``configs/drills/*.yaml``, or the body of ``POST /drills``) is a
:class:`DrillSpec`::

    name: crash_one_of_four
    job: { ...a JobSpec, with its ``faults`` plan... }
    criteria: { finished: true, min_test_accuracy: 0.95, b_hat_within_bound: true }

Each field of :class:`DrillCriteria` becomes one typed check in
:mod:`service.drills.analyse`; a criterion left at its "off" value is not checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import SpecError
from core.spec import JobSpec, format_errors


class DrillCriteria(BaseModel):
    """What a drill must show. A criterion left at None (or False) is not checked."""

    model_config = ConfigDict(extra="forbid")

    # The job ends in ``succeeded`` (not failed or cancelled).
    finished: bool = True
    min_test_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    # The measured mean B-hat stays within the bound frozen after the warm-up, and the
    # guard's verdict is ``within``.
    b_hat_within_bound: bool = False
    # Seconds from a worker's death to the next applied update (the runtime's
    # ``recovery_s`` in the summary).
    max_recovery_s: float | None = Field(default=None, gt=0.0, le=86_400.0)
    # Steps redone after a coordinator restart (``steps_lost`` in the summary).
    max_steps_lost: int | None = Field(default=None, ge=0, le=100_000_000)
    # Seconds from an injected worker crash to its detection (``recoveries`` in the summary).
    max_detect_s: float | None = Field(default=None, gt=0.0, le=86_400.0)
    # Every planned fault with a deterministic trigger fired on every target it could
    # reach (a ``fault`` event of its kind on each).
    faults_recorded: bool = True
    # Every corrupted gradient was refused as non-finite, and at least one was corrupted
    # (the summary's ``gradients_corrupted`` and ``gradients_refused_nonfinite``).
    corrupt_refused: bool = False


class DrillSpec(BaseModel):
    """A drill: one job (with its fault plan) and the criteria it must meet."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="drill", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    job: JobSpec
    criteria: DrillCriteria = Field(default_factory=DrillCriteria)


def parse_drill(data: Any) -> DrillSpec:
    """Validate a drill mapping (from YAML or HTTP).

    Raises:
        SpecError: one ``(field path, message)`` per problem, paths like ``job.mode.beta``.
    """
    if not isinstance(data, dict):
        raise SpecError([("drill", f"must be a mapping of fields, got {type(data).__name__}")])
    try:
        return DrillSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_errors(exc)) from None


def load_drill(path: str | Path) -> DrillSpec:
    """Read a drill file (YAML: ``name``, ``job``, ``criteria``).

    Raises:
        SpecError: the file is missing, is not YAML, or holds an invalid drill (the field
            paths look like ``job.faults.0.at_step``).
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise SpecError([("file", f"cannot read {p}: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([("file", f"{p} is not valid YAML: {exc}")]) from None
    return parse_drill(data)
