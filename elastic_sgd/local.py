"""Training without the service: :func:`run` trains one job on a local Ray instance.

It is what ``elastic-sgd run`` does (:func:`service.local_run.run_local`): the job's
coordinator and workers are started on an embedded Ray instance (or the cluster that
``RAY_ADDRESS`` names), and its files are written to ``out_dir``:

* ``metrics.jsonl``: one JSON record per step and per evaluation;
* ``model.pt``: ``torch.save`` of the final model (``state_dict``, ``spec``, ``step``);
* ``summary.json``: the run's summary (what :attr:`LocalRun.summary` holds);
* ``tensorboard/``: event files of the metrics, when asked (``tensorboard=True`` or the
  spec's ``tensorboard: true``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from core.spec import JobSpec, load_spec, parse_spec
from core.state import JobState
from service.local_run import run_local
from service.tensorboard import TENSORBOARD_DIR


@dataclass(frozen=True)
class LocalRun:
    """What a local run left.

    Args:
        state: how the job ended.
        summary: the run's summary (final test accuracy and loss, steps, samples/s, the
            consistency numbers), as in ``summary.json``.
        out_dir: the run's folder.
        tensorboard_dir: the folder of its TensorBoard event files (``None``: not asked for).
    """

    state: JobState
    summary: dict[str, Any]
    out_dir: Path
    tensorboard_dir: Path | None

    @property
    def model_path(self) -> Path:
        """The final model: ``torch.load(path, weights_only=True)["state_dict"]``."""
        return self.out_dir / "model.pt"

    @property
    def metrics_path(self) -> Path:
        """One JSON record per line: every step and evaluation."""
        return self.out_dir / "metrics.jsonl"

    @property
    def succeeded(self) -> bool:
        return self.state is JobState.SUCCEEDED


def job_spec(spec: JobSpec | Mapping[str, Any] | str | PathLike[str]) -> JobSpec:
    """A validated job spec from a :class:`JobSpec`, a mapping or a YAML file's path.

    Raises:
        SpecError: the file cannot be read, or fields were refused (each with its path).
    """
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, str | PathLike):
        return load_spec(Path(spec))
    return parse_spec(dict(spec))


def run(
    spec: JobSpec | Mapping[str, Any] | str | PathLike[str],
    out_dir: str | PathLike[str] = "runs/latest",
    *,
    data_dir: str | PathLike[str] | None = None,
    tensorboard: bool | None = None,
    progress: bool = False,
    placement_timeout_s: float = 60.0,
) -> LocalRun:
    """Train a job to its end without the service.

    Args:
        spec: the job: a :class:`~core.spec.JobSpec`, a mapping of its fields (validated as a
            YAML file is), or the path of a YAML spec file.
        out_dir: the run's folder (created; files of an earlier run there are replaced).
        data_dir: where ``npz`` datasets are looked up.
        tensorboard: write TensorBoard event files to ``out_dir/tensorboard`` (``None``:
            as the spec's ``tensorboard`` says).
        progress: show a progress bar and the job's events on stderr.
        placement_timeout_s: seconds to wait for the cluster to have room for the job's
            actors before failing.

    Returns:
        How the run ended, its summary and where its files are.

    Raises:
        SpecError: the spec was refused (each field with its path).
        ElasticSGDError: the job could not start (no room within ``placement_timeout_s``,
            a dataset that cannot be read, ...).
    """
    job = job_spec(spec)
    if tensorboard is not None and tensorboard != job.tensorboard:
        job = job.model_copy(update={"tensorboard": tensorboard})
    out = Path(out_dir)
    summary = run_local(
        job,
        out,
        data_dir=None if data_dir is None else Path(data_dir),
        progress=progress,
        placement_timeout_s=placement_timeout_s,
    )
    return LocalRun(
        state=JobState(summary["state"]),
        summary=summary,
        out_dir=out,
        tensorboard_dir=out / TENSORBOARD_DIR if job.tensorboard else None,
    )
