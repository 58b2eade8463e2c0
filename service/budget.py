"""Budgets: what a job will hold before it starts, and whether the service lets it.

A valid spec can still ask for more than the machine has (a 65,536-wide MLP is 8.6e9
parameters, 34 GB per copy; 2,000,000 x 1,000 generated samples are 16 GB as float64). So
before a job starts, :func:`estimate` works out its :class:`Footprint` from the spec alone,
without allocating anything: the model is built on PyTorch's ``meta`` device (shapes only)
to count its parameters, the dataset's size comes from the spec (generated) or the file
(``npz``). Then :func:`decide`, a pure policy, compares it with the :class:`Budgets` (from
:class:`service.settings.Settings`) and with what the service's live jobs already hold:

* over a per-job budget, or over a service budget even alone: **refuse** (422), naming the
  spec field that drives the excess (``model.hidden``, ``dataset.n_samples``, ``workers``)
  and the setting that holds the budget;
* within budget but not now (the live jobs hold the rest): **pend**, with the reason;
* else **admit**.

The same footprint is what the actors ask Ray for (Ray's ``memory`` resource: the
coordinator's and each worker's share, see :func:`with_memory`), so Ray's scheduler accounts
for it too, and what :func:`placement` compares with the cluster's capacity.

The estimate is an upper-bound model, not a measurement: each term below says where its
factor comes from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from core.spec import JobSpec

log = logging.getLogger(__name__)

# float32: parameters, gradients, views and the training set's rows on the wire
BYTES_PER_VALUE = 4
# generated datasets are drawn as float64 (numpy / scikit-learn), then cast to float32 and
# standardised into a new float32 array: 8 + 4 + 4 bytes per value at the peak of loading
GENERATED_BYTES_PER_VALUE = 16
# an npz file is read whole, then cast and standardised: about twice its (uncompressed) size
NPZ_LOAD_FACTOR = 2
# digits: scikit-learn's bundled 1,797 images of 8x8 pixels, 10 classes
DIGITS_SAMPLES, DIGITS_FEATURES, DIGITS_CLASSES = 1797, 64, 10
# Memory of an idle process with torch imported, measured as PSS on the job of the default
# spec (Linux, torch 2.13 CPU): a worker about 215 MiB, the coordinator about 305 MiB.
WORKER_BASE_BYTES = 224 << 20
COORDINATOR_BASE_BYTES = 320 << 20
# Copies of the parameter vector the coordinator holds: the torch module, the flat model of
# record, the update being accumulated, the consistent model B-hat compares views with, and
# a checkpoint being serialised (plus the momentum buffer when momentum > 0).
COORDINATOR_COPIES = 5
# Copies on a worker: the module, the view it computes on, autograd's gradient and the flat
# gradient it sends (plus the error-feedback memory, and local SGD's replica).
WORKER_COPIES = 4
# activations kept for backward, and their gradients, and the forward's temporaries
ACTIVATION_FACTOR = 3

GIB = 1 << 30


def gib(n_bytes: float) -> str:
    """``n_bytes`` in GiB, for messages."""
    return f"{n_bytes / GIB:.2f} GiB"


@dataclass(frozen=True)
class Footprint:
    """What one job will hold once started.

    Attributes:
        parameters: scalar parameters of the model.
        coordinator_bytes: the coordinator process: its base, the model's copies, the view
            cache, every worker's gradient slot (shared memory it creates) and the dataset.
        worker_bytes: one worker process: its base, the model's copies, activations.
        workers: the most workers the job may have at once (``max_workers`` or ``workers``).
        processes: processes Ray starts for it (one per actor: workers + coordinator).
        parts: bytes by the spec field that drives them (for the refusal's message).
    """

    parameters: int
    coordinator_bytes: int
    worker_bytes: int
    workers: int
    processes: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.coordinator_bytes + self.workers * self.worker_bytes

    @property
    def driver(self) -> str:
        """The spec field behind the largest part of the memory."""
        return max(self.parts, key=lambda k: self.parts[k]) if self.parts else "workers"

    def breakdown(self) -> str:
        """``model.hidden 30.1 GiB, workers 0.9 GiB, ...``, largest first."""
        items = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{k} {gib(v)}" for k, v in items)


@dataclass(frozen=True)
class DataShape:
    """What the model and the estimate need to know of a dataset without loading it."""

    n_samples: int
    n_features: int
    n_outputs: int
    input_shape: tuple[int, ...] | None
    load_bytes: int  # peak bytes while the coordinator loads it
    driver: str  # the spec field its size comes from


def _npz_shape(path: Path) -> DataShape:
    """Shapes from the npz's array headers (nothing but ``y`` is read), size from disk."""
    from actors.datasets import npz_shape  # numpy only, but actors load on first use

    on_disk = path.stat().st_size
    sh = npz_shape(path)
    return DataShape(
        sh.n_samples,
        sh.n_features,
        sh.n_outputs,
        sh.input_shape,
        NPZ_LOAD_FACTOR * on_disk,
        "dataset.path",
    )


def data_shape(spec: JobSpec, data_dir: Path | None = None) -> DataShape:
    """The dataset's size and the model's input and output widths, from the spec (and the
    header of an ``npz`` file in ``data_dir``); a task's data is its own (opened by each
    process, not loaded by the service): nothing is counted for it."""
    if spec.task is not None:
        return DataShape(1, 1, 1, None, 0, "task.params")
    d = spec.dataset
    if d.name == "digits":
        n = DIGITS_SAMPLES * DIGITS_FEATURES
        return DataShape(
            DIGITS_SAMPLES,
            DIGITS_FEATURES,
            DIGITS_CLASSES,
            (8, 8),
            n * GENERATED_BYTES_PER_VALUE,
            "dataset.name",
        )
    if d.name == "npz":
        path = None if data_dir is None or d.path is None else Path(data_dir) / d.path
        if path is None or not path.is_file():
            return DataShape(1, 1, 1, None, 0, "dataset.path")
        return _npz_shape(path)
    outputs = d.n_classes if d.name == "synthetic_classification" else 1
    return DataShape(
        d.n_samples,
        d.n_features,
        outputs,
        None,
        d.n_samples * d.n_features * GENERATED_BYTES_PER_VALUE,
        "dataset.n_samples",
    )


def count_parameters(spec: JobSpec, data_dir: Path | None = None) -> int:
    """Parameters of the job's model: its task's ``build_model`` on the ``meta`` device (no
    memory allocated; a model that cannot be built there is built on the CPU).

    Returns:
        The count; 0 when the task's ``build_model`` raises (the job then fails at its
        start with the task's own error, where its traceback is logged).

    Raises:
        ModelError: a built-in model cannot be built for its data.
        SpecError: the task's entrypoint cannot be loaded.
    """
    import torch  # imported when first used: the job manager imports this module

    from actors.models import ModelError, n_parameters
    from actors.tasks.loader import job_task

    task = job_task(spec, data_dir)
    try:
        with torch.device("meta"):
            return n_parameters(task.build_model())
    except ModelError:
        raise
    except Exception:
        log.debug("task %s: meta build failed, building on the CPU", spec.task, exc_info=True)
    try:
        return n_parameters(task.build_model())
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - the task's own error: the job's start reports it
        log.info("task %s: build_model raised; the job's start reports it", spec.task)
        return 0


def _model_field(spec: JobSpec) -> str:
    if spec.task is not None:
        return "task.params"
    # logreg's size is n_features x n_outputs; mlp's and cnn's are set by hidden
    return "dataset.n_features" if spec.model.name == "logreg" else "model.hidden"


def estimate(spec: JobSpec, data_dir: Path | None = None) -> Footprint:
    """The job's :class:`Footprint` (see the module docstring for each term).

    Raises:
        ModelError: the model cannot be built for this data (as the coordinator would).
    """
    from actors.coordinator.dataplane import VIEW_CACHE_SIZE

    shape = data_shape(spec, data_dir)
    p = count_parameters(spec, data_dir)
    workers = spec.max_workers_or_workers
    vec = p * BYTES_PER_VALUE
    coord_copies = COORDINATOR_COPIES + (1 if spec.optimizer.momentum > 0 else 0)
    ef = spec.compression.name != "none" and spec.compression.error_feedback
    worker_copies = WORKER_COPIES + int(ef) + int(spec.mode.name == "local")
    # the coordinator: its copies, the view cache and one gradient slot per worker (/dev/shm)
    coord_model = vec * (coord_copies + VIEW_CACHE_SIZE + workers)
    widths = shape.n_features + sum(spec.model.hidden) + shape.n_outputs
    if spec.model.name == "cnn":  # every conv layer's activation is a whole feature map
        widths = shape.n_features * (1 + sum(spec.model.hidden))
    if spec.task is not None:  # a task's data and activations are its own: not estimated
        widths = 0
    activations = spec.batch_size * widths * BYTES_PER_VALUE * ACTIVATION_FACTOR
    worker_model = vec * worker_copies
    model_field = _model_field(spec)
    parts = {
        model_field: coord_model + workers * worker_model,
        shape.driver: shape.load_bytes,
        "workers": COORDINATOR_BASE_BYTES + workers * WORKER_BASE_BYTES,
        "batch_size": workers * activations,
    }
    return Footprint(
        parameters=p,
        coordinator_bytes=COORDINATOR_BASE_BYTES + coord_model + shape.load_bytes,
        worker_bytes=WORKER_BASE_BYTES + worker_model + activations,
        workers=workers,
        processes=workers + 1,
        parts=parts,
    )


# -- the policy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Budgets:
    """The limits a job is checked against (from the service's settings).

    Attributes:
        job_memory_bytes: one job's estimated memory (``ESGD_JOB_MEMORY_BYTES``).
        service_memory_bytes: all live jobs' together (``ESGD_SERVICE_MEMORY_BYTES``).
        job_workers: one job's ``max_workers`` or ``workers`` (``ESGD_JOB_WORKERS``).
        service_processes: all live jobs' actor processes (``ESGD_SERVICE_PROCESSES``).
    """

    job_memory_bytes: int
    service_memory_bytes: int
    job_workers: int
    service_processes: int


@dataclass(frozen=True)
class Usage:
    """What the service's live jobs hold (the sum of their footprints)."""

    memory_bytes: int = 0
    processes: int = 0

    def plus(self, fp: Footprint) -> Usage:
        return Usage(self.memory_bytes + fp.total_bytes, self.processes + fp.processes)


def usage_of(footprints: Sequence[Footprint]) -> Usage:
    """The :class:`Usage` of these jobs together."""
    out = Usage()
    for fp in footprints:
        out = out.plus(fp)
    return out


class Verdict(StrEnum):
    """What admission does with a job."""

    ADMIT = "admit"  # within every budget, with room now
    PEND = "pend"  # within budget, but the live jobs hold the room: wait
    REFUSE = "refuse"  # over a budget even alone: never (422)


@dataclass(frozen=True)
class Decision:
    """A verdict with its reasons: ``problems`` (field, message) for a refusal, ``reason``
    for a job that waits."""

    verdict: Verdict
    problems: list[tuple[str, str]] = field(default_factory=list)
    reason: str = ""


def _workers_field(spec: JobSpec) -> str:
    return "max_workers" if spec.max_workers is not None else "workers"


def refusals(spec: JobSpec, fp: Footprint, b: Budgets) -> list[tuple[str, str]]:
    """Every budget the job exceeds on its own, as ``(spec field, message)``."""
    problems: list[tuple[str, str]] = []
    if fp.workers > b.job_workers:
        problems.append(
            (
                _workers_field(spec),
                f"{fp.workers} workers is over the per-job budget of {b.job_workers} "
                f"(ESGD_JOB_WORKERS); use at most {b.job_workers} workers",
            )
        )
    if fp.processes > b.service_processes:
        problems.append(
            (
                _workers_field(spec),
                f"{fp.workers} workers start {fp.processes} processes, over the service's "
                f"budget of {b.service_processes} (ESGD_SERVICE_PROCESSES)",
            )
        )
    limit, setting = min(
        (b.job_memory_bytes, "ESGD_JOB_MEMORY_BYTES"),
        (b.service_memory_bytes, "ESGD_SERVICE_MEMORY_BYTES"),
    )
    if fp.total_bytes > limit:
        problems.append(
            (
                fp.driver,
                f"the job would hold about {gib(fp.total_bytes)} ({fp.parameters:,} "
                f"parameters; {fp.breakdown()}), over the memory budget of {gib(limit)} "
                f"({setting}); make {fp.driver} smaller",
            )
        )
    return problems


def decide(spec: JobSpec, fp: Footprint, b: Budgets, in_use: Usage) -> Decision:
    """Admit, pend or refuse a job given what the live jobs hold (see the module docstring)."""
    problems = refusals(spec, fp, b)
    if problems:
        return Decision(Verdict.REFUSE, problems=problems)
    after = in_use.plus(fp)
    if after.memory_bytes > b.service_memory_bytes:
        return Decision(
            Verdict.PEND,
            reason=(
                f"waiting for memory: needs about {gib(fp.total_bytes)}, the live jobs hold "
                f"{gib(in_use.memory_bytes)} of the service's {gib(b.service_memory_bytes)} "
                "(ESGD_SERVICE_MEMORY_BYTES)"
            ),
        )
    if after.processes > b.service_processes:
        return Decision(
            Verdict.PEND,
            reason=(
                f"waiting for processes: needs {fp.processes}, the live jobs run "
                f"{in_use.processes} of the service's {b.service_processes} "
                "(ESGD_SERVICE_PROCESSES)"
            ),
        )
    return Decision(Verdict.ADMIT)


def with_memory(bundles: Sequence[Mapping[str, float]], fp: Footprint) -> list[dict[str, float]]:
    """The job's resource bundles (coordinator first, then one per worker) with the memory
    each actor asks Ray for."""
    out = [dict(b) for b in bundles]
    for i, b in enumerate(out):
        b["memory"] = float(fp.coordinator_bytes if i == 0 else fp.worker_bytes)
    return out


# -- placement -----------------------------------------------------------------------------

_EPS = 1e-9  # Ray accounts fractional CPUs in 1e-4 units; anything smaller is rounding


def total(bundles: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The sum of ``bundles``, resource by resource."""
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def shortfall(need: Mapping[str, float], have: Mapping[str, float]) -> dict[str, float]:
    """The resources of ``need`` that ``have`` lacks, and by how much."""
    return {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + _EPS}


def describe(res: Mapping[str, float]) -> str:
    """``CPU=3.25, memory=2.10 GiB`` (only the resources jobs ask for)."""
    parts = []
    for k in sorted(res):
        if k == "memory":
            parts.append(f"memory={gib(res[k])}")
        elif k in ("CPU", "GPU"):
            parts.append(f"{k}={res[k]:g}")
    return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class Placement:
    """Whether a job's actors can be placed now, or ever, and the message saying so."""

    now: bool
    ever: bool
    message: str


def placement(
    need: Mapping[str, float], total: Mapping[str, float], free: Mapping[str, float]
) -> Placement:
    """Compare a job's total need with the cluster's capacity and its free resources."""
    keys = {k: v for k, v in need.items() if k in ("CPU", "GPU", "memory")}
    never = shortfall(keys, total)
    busy = shortfall(keys, free)
    if never:
        msg = (
            f"the job needs {describe(keys)} but the cluster has only {describe(total)} in "
            f"all: lower workers or resources.worker_cpus, or add nodes"
        )
    elif busy:
        msg = (
            f"the job needs {describe(keys)}; the cluster has {describe(free)} free of "
            f"{describe(total)}: waiting for other jobs to finish"
        )
    else:
        msg = f"the job needs {describe(keys)}; the cluster has {describe(free)} free"
    return Placement(now=not busy, ever=not never, message=msg)
