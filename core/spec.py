"""The job spec: the one typed description of a training job.

Config enters elastic-sgd once, here, at the edge (YAML file, HTTP body or CLI flag) and is
validated into a :class:`JobSpec`. Nothing untyped goes further in: the coordinator and the
workers receive this model (or pieces of it). Unknown keys and out-of-range values are
refused with the field's path and the allowed range (:func:`parse_spec`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.errors import SpecError

ModelName = Literal["logreg", "mlp", "cnn"]
DatasetName = Literal["digits", "synthetic_classification", "least_squares", "npz"]
# What stands in for a gradient that never arrives (docs/consistency.md, "Missing gradients").
MissingPolicy = Literal["zero_fill", "reaverage", "own"]
# Former policy names -> what they did, under the name to use now (refused, never aliased:
# ``substitute`` was described as the variance-bounded scheduler, which it was not).
RENAMED_MISSING_POLICIES = {"skip": "zero_fill", "substitute": "reaverage"}


# Bounds of the spec's lists (every number and list of a spec has a bound; see
# tests/unit/test_spec.py): deeper networks, longer fault plans or exact-step lists than
# these are not experiments this service runs, and each item costs work in the coordinator.
MAX_LAYERS = 32
MAX_FAULTS = 1000
MAX_SCALE_ACTIONS = 1000
MAX_FAULT_STEPS = 10_000
# The largest step a spec may name (= the bound of ``JobSpec.steps``).
MAX_STEPS = 100_000_000
# The most workers a job may have (= the bound of ``JobSpec.workers``); ids are below it.
MAX_WORKERS = 4096


class _Strict(BaseModel):
    """Base for every spec section: unknown keys are refused, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSpec(_Strict):
    """Which network to train; names come from the model registry only."""

    name: ModelName = "mlp"
    # Hidden layer widths for ``mlp``; channels of the two conv layers for ``cnn``.
    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [64], max_length=MAX_LAYERS
    )


class DatasetSpec(_Strict):
    """Where the training data comes from; every source is local (nothing is downloaded)."""

    name: DatasetName = "digits"
    # Fraction of the samples held out for evaluation (fixed split, chosen by ``seed``).
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # Size of generated datasets (ignored for digits and npz).
    n_samples: int = Field(default=4096, ge=16, le=10_000_000)
    n_features: int = Field(default=32, ge=1, le=100_000)
    n_classes: int = Field(default=10, ge=2, le=10_000)
    # Label noise of the least-squares target (std of the additive Gaussian noise).
    noise: float = Field(default=0.01, ge=0.0, le=100.0)
    # For ``npz``: a file name *inside* the configured data directory (no absolute paths,
    # no ``..``); the file holds arrays ``x`` and ``y``.
    path: str | None = Field(default=None, max_length=255)

    @model_validator(mode="after")
    def _check_path(self) -> DatasetSpec:
        if self.name == "npz":
            if not self.path:
                raise ValueError("dataset.path is required when dataset.name is 'npz'")
            p = Path(self.path)
            if p.is_absolute() or ".." in p.parts or self.path.startswith("~"):
                raise ValueError(
                    "dataset.path must be a relative file name inside the data directory "
                    "(no absolute path, no '..', no '~')"
                )
            if p.suffix != ".npz":
                raise ValueError("dataset.path must end in .npz")
        elif self.path is not None:
            raise ValueError("dataset.path is only allowed when dataset.name is 'npz'")
        return self


# Bounds of a task's params (a JSON object checked before the task sees it): a task's
# settings are a few dozen values; these keep a request from making the service walk a huge
# or deeply nested structure (each is far past any real task's needs).
MAX_PARAMS_DEPTH = 8
MAX_PARAMS_ITEMS = 10_000  # values in the whole object, nested ones included
MAX_PARAMS_KEY_CHARS = 128
MAX_PARAMS_STRING_CHARS = 4096
# ``pkg.module:attr``: a dotted module path, a colon, an attribute (dotted for a nested one)
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
ENTRYPOINT_PATTERN = rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$"


def _check_scalar(value: Any, path: str) -> None:
    """A leaf of a task's params: a bounded string, a finite number, a boolean or null."""
    if isinstance(value, str):
        if len(value) > MAX_PARAMS_STRING_CHARS:
            raise ValueError(
                f"{path}: strings may hold at most {MAX_PARAMS_STRING_CHARS} characters"
            )
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: numbers must be finite")
    elif value is not None and not isinstance(value, (bool, int)):
        raise ValueError(
            f"{path}: only JSON values (objects, lists, strings, numbers, booleans, null)"
        )


def _check_params(value: Any, path: str, depth: int, count: list[int]) -> None:
    """Refuse anything in a task's params that is not bounded JSON (see the bounds above).

    Raises:
        ValueError: naming the place (``task.params.<key>...``) and the bound.
    """
    count[0] += 1
    if count[0] > MAX_PARAMS_ITEMS:
        raise ValueError(f"task.params holds more than {MAX_PARAMS_ITEMS} values")
    if not isinstance(value, (dict, list)):
        _check_scalar(value, path)
        return
    if depth >= MAX_PARAMS_DEPTH:
        raise ValueError(f"{path} nests deeper than {MAX_PARAMS_DEPTH} levels")
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        if isinstance(value, dict) and not (
            isinstance(k, str) and 0 < len(k) <= MAX_PARAMS_KEY_CHARS
        ):
            raise ValueError(
                f"{path}: keys must be strings of 1 to {MAX_PARAMS_KEY_CHARS} characters"
            )
        _check_params(v, f"{path}.{k}", depth + 1, count)


class TaskSpec(_Strict):
    """The job's task, named by import path (``actors/tasks``; docs/tasks.md).

    The service imports only entrypoints under the module prefixes its operator allows
    (``ESGD_TASK_MODULES``); ``params`` go to the entrypoint (validated by its pydantic model
    when it gives one).
    """

    entrypoint: str = Field(max_length=200, pattern=ENTRYPOINT_PATTERN)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _bounded_json(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_params(v, "task.params", 0, [0])
        return v

    @property
    def module(self) -> str:
        """The entrypoint's module path (before the colon)."""
        return self.entrypoint.partition(":")[0]


class ConstantSchedule(_Strict):
    """The learning rate stays ``optimizer.lr`` for the whole run."""

    name: Literal["constant"] = "constant"


class WarmupCosineSchedule(_Strict):
    """Linear warm-up, then cosine decay to the end of the run
    (``torch.optim.lr_scheduler.LambdaLR``; actors/schedules.py: :func:`warmup_cosine_factor`).

    The lr of step ``t`` (0-based) is ``lr * (t + 1) / warmup_steps`` for
    ``t < warmup_steps``, then ``lr * (r + (1 - r) * (1 + cos(pi * s)) / 2)`` with
    ``s = (t - warmup_steps) / (total_steps - warmup_steps)`` and ``r = min_lr_ratio``; the
    run's total steps come from ``steps`` or ``epochs``.
    """

    name: Literal["warmup_cosine"] = "warmup_cosine"
    # 0: no warm-up (cosine from the first step)
    warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS)
    # the final lr as a share of ``optimizer.lr`` (0: decay to zero)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)


class StepSchedule(_Strict):
    """The lr is multiplied by ``gamma`` every ``step_size`` steps
    (``torch.optim.lr_scheduler.StepLR``)."""

    name: Literal["step"] = "step"
    step_size: int = Field(ge=1, le=MAX_STEPS)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)


ScheduleSpec = Annotated[
    ConstantSchedule | WarmupCosineSchedule | StepSchedule, Field(discriminator="name")
]


class ParamGroupSpec(_Strict):
    """Settings for the parameters whose name (as ``named_parameters()`` spells it, e.g.
    ``net.0.bias``) matches the regular expression ``match`` (``re.search``); the first
    group that matches a parameter decides, unset fields keep the optimizer's."""

    match: str = Field(min_length=1, max_length=256)
    weight_decay: float | None = Field(default=None, ge=0.0, le=1.0)
    # multiplies optimizer.lr (and the schedule) for these parameters
    lr_scale: float | None = Field(default=None, ge=0.0, le=100.0)

    @field_validator("match")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc}); e.g. 'bias$'") from None
        return v


# Adam's own defaults (torch.optim.Adam)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
_ADAM_FIELDS = ("betas", "eps")
_SGD_FIELDS = ("momentum", "nesterov")


class OptimizerSpec(_Strict):
    """The optimizer the coordinator applies to the model of record (``torch.optim`` SGD,
    Adam or AdamW; actors/optim.py), its lr schedule, clipping and parameter groups.

    ``momentum``/``nesterov`` belong to ``sgd``; ``betas``/``eps`` to ``adam``/``adamw``
    (given for the other kind they are refused). ``weight_decay`` is L2 added to the
    gradient for ``sgd`` and ``adam``, decoupled for ``adamw`` (torch's meaning).
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.05, gt=0.0, le=100.0)
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    nesterov: bool = False
    # adam/adamw only; None: torch's defaults (ADAM_BETAS, ADAM_EPS)
    betas: (
        tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]]
        | None
    ) = None
    eps: float | None = Field(default=None, gt=0.0, le=1.0)
    schedule: ScheduleSpec = Field(default_factory=ConstantSchedule)
    # clip the averaged gradient to this global L2 norm (torch.nn.utils.clip_grad_norm_)
    clip_grad_norm: float | None = Field(default=None, gt=0.0, le=1e6)
    param_groups: list[ParamGroupSpec] = Field(default_factory=list, max_length=MAX_LAYERS)
    # biases and every 1-D parameter (LayerNorm/BatchNorm weights) get weight_decay 0
    # (a group in ``param_groups`` that sets weight_decay for a parameter wins)
    no_decay_bias_and_norm: bool = False

    @property
    def adam_betas(self) -> tuple[float, float]:
        return self.betas if self.betas is not None else ADAM_BETAS

    @property
    def adam_eps(self) -> float:
        return self.eps if self.eps is not None else ADAM_EPS

    @property
    def adaptive(self) -> bool:
        """Adam or AdamW: the update is scaled per coordinate (docs/consistency.md)."""
        return self.name in ("adam", "adamw")

    @field_validator(*_SGD_FIELDS, *_ADAM_FIELDS)
    @classmethod
    def _belongs_to_name(cls, v: Any, info: ValidationInfo) -> Any:
        """A field of the other kind of optimizer, given, is refused (not ignored)."""
        name = info.data.get("name", "sgd")
        adaptive = name in ("adam", "adamw")
        # the other kind's "off" values (a dumped spec holds them) are no setting
        unset = v is None or (info.field_name in _SGD_FIELDS and not v)
        if not unset and info.field_name in (_SGD_FIELDS if adaptive else _ADAM_FIELDS):
            owner = "sgd" if adaptive else "adam and adamw"
            raise ValueError(
                f"belongs to {owner}, not {name}; remove it (sgd: lr, momentum, "
                f"weight_decay, nesterov; adam/adamw: lr, betas, eps, weight_decay)"
            )
        return v

    @model_validator(mode="after")
    def _check_nesterov(self) -> OptimizerSpec:
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("optimizer.nesterov needs optimizer.momentum > 0")
        return self


class SyncMode(_Strict):
    """Every live worker's step-k gradient is applied before anyone starts step k+1 (B = 0)."""

    name: Literal["sync"] = "sync"


class ElasticMode(_Strict):
    """The paper's elastic scheduling rule, per parameter block (actors/modes/elastic.py).

    Workers send their gradient block by block as backward produces it; the coordinator
    applies a block's averaged step-k update once every expected gradient of that block
    arrived. A worker starts step k+1 once the blocks whose averaged step-k update is
    applied make up >= ``beta`` of its own step-k gradient (per-block L2 norms), and never
    more than ``max_lag`` steps ahead of an incomplete step. ``beta = 1`` is sync.
    """

    name: Literal["elastic"] = "elastic"
    beta: float = Field(default=0.5, ge=0.0, le=1.0)
    max_lag: int = Field(default=2, ge=1, le=64)


class StragglerMode(_Strict):
    """Straggler-tolerant steps (actors/modes/straggler.py).

    A worker that sent its step-k gradient starts step k+1 once at least ``beta`` of the
    *other* workers assigned to step k have sent theirs (or step k is complete), never more
    than ``max_lag`` steps ahead of an incomplete step; its view is the model of record plus
    the partial updates of the incomplete steps. ``beta = 1`` waits for the whole step
    (sync); ``beta = 0`` never waits for the others.
    """

    name: Literal["straggler"] = "straggler"
    beta: float = Field(default=0.5, ge=0.0, le=1.0)
    max_lag: int = Field(default=2, ge=1, le=64)


class AsyncMode(_Strict):
    """Workers never wait; each gradient is applied on arrival (bounded staleness)."""

    name: Literal["async"] = "async"
    # A gradient computed on a view more than this many updates old is stale.
    max_staleness: int = Field(default=4, ge=0, le=10_000)
    # ``refuse``: drop stale gradients (counted); ``wait``: hold back fresher workers'
    # updates until the oldest outstanding gradient arrives, so none is ever stale.
    on_stale: Literal["refuse", "wait"] = "refuse"
    # ``as_set``: every gradient is applied with the optimizer's momentum as given.
    # ``match_sync``: with SGD momentum mu and p workers, applied with
    # mu_a = max(0, 1 - p (1 - mu)), so that a gradient's long-run share of the model, lr/(1 -
    # mu_a), is what the same optimizer gives it in a synchronous step of p, lr/(p (1 - mu));
    # staleness itself acts as momentum (docs/consistency.md, "async(τ)", "Momentum").
    momentum_scaling: Literal["as_set", "match_sync"] = "as_set"


def match_sync_momentum(momentum: float, workers: int) -> float:
    """The momentum ``async`` applies per gradient under ``momentum_scaling: match_sync``:
    ``1 - mu_a = p (1 - mu)`` (0 if that is past 1; 0 stays 0)."""
    if momentum == 0.0:
        return 0.0
    return max(0.0, 1.0 - workers * (1.0 - momentum))


class LocalMode(_Strict):
    """Local SGD: each worker takes ``local_steps`` plain SGD steps on its own replica from
    the model of record, then the coordinator applies the mean of the model deltas (one
    round is one step; see actors/modes/local.py and docs/consistency.md)."""

    name: Literal["local"] = "local"
    # H: local steps per round (1 is sync; 1024 caps a round at a sane amount of drift)
    local_steps: int = Field(default=4, ge=1, le=1024)


ModeSpec = Annotated[
    SyncMode | ElasticMode | StragglerMode | AsyncMode | LocalMode, Field(discriminator="name")
]


class CompressionSpec(_Strict):
    """Per-worker gradient compression, with optional error-feedback memory."""

    name: Literal["none", "topk", "randomk", "qsgd", "sign"] = "none"
    # Fraction of coordinates kept by ``topk`` / ``randomk``.
    fraction: float = Field(default=0.1, gt=0.0, le=1.0)
    # Quantisation levels of ``qsgd`` (s in the QSGD paper).
    levels: int = Field(default=16, ge=1, le=65535)
    error_feedback: bool = True


class ResourcesSpec(_Strict):
    """What each actor asks Ray for. Fractions let several workers share one core."""

    # 4 workers x 0.25 + coordinator 0.25 = 1.25 CPUs: fits a 2-core machine.
    # At least 0.05: Ray runs one process per actor whatever its CPU share, so a tiny share
    # lets thousands of processes onto a few cores (4096 x 0.0001 CPU started ~150 processes
    # and took 17 GB); 0.05 caps a core at 20 workers.
    worker_cpus: float = Field(default=0.25, ge=0.05, le=256.0)
    # "auto": a share of a GPU when the cluster has GPUs, else none.
    worker_gpus: float | Literal["auto"] = "auto"
    coordinator_cpus: float = Field(default=0.25, gt=0.0, le=256.0)
    # Torch intra-op threads per worker (1 keeps workers from fighting over cores).
    torch_threads: int = Field(default=1, ge=1, le=256)

    @model_validator(mode="after")
    def _check_gpus(self) -> ResourcesSpec:
        g = self.worker_gpus
        if not isinstance(g, str) and not 0.0 <= g <= 64.0:
            raise ValueError("resources.worker_gpus must be 'auto' or a number in [0, 64]")
        return self


class FaultSpec(_Strict):
    """One injected fault: what, on whom, when, for how long."""

    kind: Literal["crash", "drop", "delay", "partition", "coordinator_crash", "corrupt"]
    # Target: explicit worker ids, or a count of workers picked by the seeded RNG.
    workers: list[Annotated[int, Field(ge=0, le=MAX_WORKERS - 1)]] | None = Field(
        default=None, max_length=MAX_WORKERS
    )
    count: int | None = Field(default=None, ge=1, le=MAX_WORKERS)
    # Trigger: at a step, at seconds since start, or with a probability per step.
    at_step: int | None = Field(default=None, ge=0, le=10_000_000)
    at_s: float | None = Field(default=None, ge=0.0, le=1e6)
    probability: float | None = Field(default=None, ge=0.0, le=1.0)
    # Exact steps (for ``drop``).
    steps: list[Annotated[int, Field(ge=0, le=MAX_STEPS)]] | None = Field(
        default=None, max_length=MAX_FAULT_STEPS
    )
    # Window length for delay, partition and corrupt (steps or seconds; whichever is given).
    duration_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    duration_s: float | None = Field(default=None, gt=0.0, le=1e6)
    # ``crash``: restart the worker after this many seconds.
    rejoin_after_s: float | None = Field(default=None, ge=0.0, le=1e5)
    # ``delay``: distribution of the per-step delay, and its mean (or constant) in ms.
    distribution: Literal["constant", "exponential", "pareto"] = "constant"
    delay_ms: float = Field(default=0.0, ge=0.0, le=600_000.0)
    # Pareto shape (tail index); smaller is heavier. Mean exists for shape > 1.
    pareto_shape: float = Field(default=1.5, gt=1.0, le=100.0)
    # ``corrupt``: what each gradient of the window becomes before it is sent: ``nan`` or
    # ``inf`` in every entry (refused by the coordinator, never applied), or ``scale``d by
    # ``scale_factor`` (finite: applied; a negative factor flips it, 0 zeroes it).
    corruption: Literal["nan", "inf", "scale"] | None = None
    # 1e6: far past any useful attack, and a float32 entry below 3e32 stays finite
    scale_factor: float | None = Field(default=None, ge=-1e6, le=1e6)

    @model_validator(mode="after")
    def _check(self) -> FaultSpec:
        if self.workers is not None and self.count is not None:
            raise ValueError("give either workers or count, not both")
        if self.kind == "coordinator_crash":
            if self.workers is not None or self.count is not None:
                raise ValueError("coordinator_crash takes no workers/count target")
            if self.at_step is None:
                raise ValueError("coordinator_crash needs at_step")
        triggers = [
            self.at_step is not None,
            self.at_s is not None,
            self.probability is not None,
            self.steps is not None,
        ]
        if sum(triggers) > 1:
            raise ValueError("give one trigger: at_step, at_s, probability or steps")
        if self.kind == "delay" and self.delay_ms <= 0.0:
            raise ValueError("delay needs delay_ms > 0")
        if self.kind == "partition" and self.duration_s is None and self.duration_steps is None:
            raise ValueError("partition needs duration_s or duration_steps")
        if self.steps is not None and self.kind != "drop":
            raise ValueError("steps (an exact list) is only allowed for drop faults")
        self._check_corrupt()
        return self

    def _check_corrupt(self) -> None:
        """``corruption`` and ``scale_factor`` belong to ``corrupt`` faults, and agree."""
        if self.kind != "corrupt":
            if self.corruption is not None or self.scale_factor is not None:
                raise ValueError("corruption and scale_factor are only allowed for corrupt faults")
            return
        if self.corruption is None:
            raise ValueError("corrupt needs corruption: nan, inf or scale")
        if self.corruption != "scale":
            if self.scale_factor is not None:
                raise ValueError(
                    f"scale_factor is only allowed with corruption: scale (got "
                    f"corruption: {self.corruption}); remove it"
                )
            return
        if self.scale_factor is None:
            raise ValueError(
                "corruption: scale needs scale_factor (the factor each gradient is "
                "multiplied by, in [-1e6, 1e6])"
            )
        if self.scale_factor == 1.0:
            raise ValueError("scale_factor 1 leaves the gradient unchanged; give another factor")


class ScaleAction(_Strict):
    """Resize the running job to ``workers`` when it reaches ``at_step`` (drills, rehearsals)."""

    at_step: int = Field(ge=1, le=100_000_000)
    workers: int = Field(ge=1, le=MAX_WORKERS)


class CheckpointSpec(_Strict):
    """How often the coordinator writes an atomic, checksummed checkpoint (whichever of the
    two intervals comes first; ``null`` turns one off).

    By default every 30 s, so that any job can be resumed after its coordinator is lost
    with the service's own Ray instance; a job with both intervals off cannot.
    """

    interval_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    interval_s: float | None = Field(default=30.0, gt=0.0, le=1e6)
    keep: int = Field(default=3, ge=1, le=100)
    # The floor on the interval: checkpoints may take at most this share of the run's wall
    # time. After each write, the next one waits at least (its cost / share) seconds, so
    # ``interval_steps: 1`` on a fast job writes, at 0.1 and a 20 ms checkpoint, at most
    # every 200 ms instead of every step (the coordinator says so in an event, once).
    max_time_share: float = Field(default=0.1, gt=0.0, le=1.0)


class GuardSpec(_Strict):
    """The consistency guard: the warm-up that states the bound, and what happens when a run
    leaves it (docs/consistency.md: the guard).

    Over the first ``warmup_steps`` steps the constants the bounds are written in (M, sigma,
    L) are estimated, then frozen; from then on the run is judged. *Out of bound*: the mean
    B-hat over the last ``window_steps`` samples exceeds the stated bound. *Diverged*: a
    loss or a gradient is non-finite, or a step's loss exceeds ``divergence_factor`` x the
    warm-up's (median) loss.
    """

    # 20 steps: enough gradients (20 x workers) for a max and a spread, short against the
    # 200-400 steps of the shipped configs
    warmup_steps: int = Field(default=20, ge=1, le=100_000)
    # the verdict's window: the mean of the last 50 B-hat samples (a few steps' views)
    window_steps: int = Field(default=50, ge=1, le=1_000_000)
    # M = safety_factor x the largest gradient norm of the warm-up (gradient norms shrink
    # as training converges; the factor covers a noisy batch beyond the warm-up's maximum)
    safety_factor: float = Field(default=2.0, ge=1.0, le=100.0)
    # a loss this many times the warm-up's is divergence
    divergence_factor: float = Field(default=10.0, gt=1.0, le=1e12)
    # warn: an event, the run goes on; tighten: a stricter setting, live; fail: end failed
    on_out_of_bound: Literal["warn", "tighten", "fail"] = "warn"
    # fail: end failed; rollback: back to the last checkpoint taken inside the bound, with
    # a stricter setting (needs checkpoints: a state folder and a checkpoint interval)
    on_diverged: Literal["fail", "rollback"] = "fail"
    # a rollback returns to a checkpoint at least this many steps before the step that saw
    # the divergence (else to the oldest kept): the one just before may already hold a model
    # on its way out, its loss measured at a staler view that still looked healthy
    rollback_margin_steps: int = Field(default=5, ge=0, le=1_000_000)
    # rollbacks and tightenings a run may take before the guard fails it instead
    max_actions: int = Field(default=8, ge=0, le=1000)


class JobSpec(_Strict):
    """A whole training job.

    ``steps`` counts updates of the model of record. In ``async`` mode every gradient is its
    own update, so one step there is ``workers`` applied gradients (the same samples as a
    synchronous step).
    """

    name: str = Field(default="job", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    # What is trained: a task named by import path, or (without ``task``) the built-in task
    # made of ``model`` and ``dataset`` (actors/tasks/builtin.py); not both.
    task: TaskSpec | None = None
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    # Workers compute forward and loss under ``autocast`` to this dtype (CPU and CUDA);
    # parameters, gradients and the model of record stay float32.
    precision: Literal["float32", "bfloat16"] = "float32"
    # DataLoader worker processes per training worker (0: load in the worker itself).
    # 8: each is a process; more than a few per worker only oversubscribes the cores.
    loader_workers: int = Field(default=0, ge=0, le=8)
    batch_size: int = Field(default=32, ge=1, le=1_000_000)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    epochs: float | None = Field(default=None, gt=0.0, le=1_000_000.0)
    workers: int = Field(default=4, ge=1, le=MAX_WORKERS)
    min_workers: int = Field(default=1, ge=1, le=MAX_WORKERS)
    max_workers: int | None = Field(default=None, ge=1, le=MAX_WORKERS)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    mode: ModeSpec = Field(default_factory=SyncMode)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    eval_interval: int = Field(default=20, ge=1, le=10_000_000)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    # How views and gradients move: ``shared_memory`` when coordinator and worker share a
    # host (/dev/shm, zero-copy), ``object_store`` through Ray, ``auto`` picks per worker.
    transport: Literal["auto", "object_store", "shared_memory"] = "auto"
    # Wire precision of gradients and views over the object store.
    transfer_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Measure B-hat on every n-th view (1 = every view).
    monitor_interval: int = Field(default=1, ge=1, le=1_000_000)
    # A gradient that never arrives (dropped message), docs/consistency.md "Missing
    # gradients": ``zero_fill`` counts it as zero (the step divides by the expected count),
    # ``reaverage`` averages what arrived, ``own`` hands each worker a view in which its own
    # gradient of the step stands in for each missing one (the model of record re-averages).
    # The former names ``skip`` / ``substitute`` are refused with the new name to use.
    missing_policy: MissingPolicy = "zero_fill"
    # Start a new worker in place of one that died (unless its fault plans a rejoin).
    replace_lost_workers: bool = True
    # How often Ray may restart a crashed coordinator (it resumes from the last checkpoint).
    max_coordinator_restarts: int = Field(default=3, ge=0, le=100)
    faults: list[FaultSpec] = Field(default_factory=list, max_length=MAX_FAULTS)
    # Planned resizes while the job runs (each within [min_workers, max_workers]).
    scale_plan: list[ScaleAction] = Field(default_factory=list, max_length=MAX_SCALE_ACTIONS)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    # The consistency guard: warm-up, frozen bound, what to do out of bound or diverged.
    guard: GuardSpec = Field(default_factory=GuardSpec)
    # Seconds without news from a worker before it is declared lost.
    heartbeat_timeout_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    # Also write the metrics as TensorBoard event files, in ``tensorboard/`` of the job's
    # folder (docs/sdk.md, "TensorBoard").
    tensorboard: bool = False

    @field_validator("missing_policy", mode="before")
    @classmethod
    def _renamed_policy(cls, v: Any) -> Any:
        if isinstance(v, str) and v in RENAMED_MISSING_POLICIES:
            raise ValueError(
                f"missing_policy {v!r} was renamed: use {RENAMED_MISSING_POLICIES[v]!r} "
                f"(policies: zero_fill, reaverage, own; docs/consistency.md)"
            )
        return v

    @model_validator(mode="after")
    def _check_job(self) -> JobSpec:
        # set and not the defaults: a dumped spec (the store keeps model_dump()) re-validates
        given = {
            k
            for k, default in (("model", ModelSpec()), ("dataset", DatasetSpec()))
            if k in self.model_fields_set and getattr(self, k) != default
        }
        if self.task is not None and given:
            raise ValueError(
                f"give either task or {' and '.join(sorted(given))}, not both: model and "
                "dataset are the params of the built-in task (drop them, or drop task)"
            )
        if self.steps is None and self.epochs is None:
            raise ValueError("give steps or epochs")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.min_workers > self.workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) must be <= workers ({self.workers})"
            )
        if self.max_workers is not None and self.max_workers < self.workers:
            raise ValueError(
                f"max_workers ({self.max_workers}) must be >= workers ({self.workers})"
            )
        for i, a in enumerate(self.scale_plan):
            if not self.min_workers <= a.workers <= self.max_workers_or_workers:
                raise ValueError(
                    f"scale_plan.{i}.workers={a.workers} is outside [min_workers="
                    f"{self.min_workers}, max_workers={self.max_workers_or_workers}]"
                )
        mode = self.mode
        if (
            isinstance(mode, AsyncMode)
            and mode.momentum_scaling == "match_sync"
            and self.optimizer.adaptive
        ):
            raise ValueError(
                "mode.momentum_scaling: 'match_sync' scales SGD's momentum; with "
                f"optimizer.name {self.optimizer.name!r} use 'as_set' (Adam's moments are "
                "averages, not sums: there is no gain to match)"
            )
        for i, f in enumerate(self.faults):
            ids = f.workers or []
            if any(w >= self.max_workers_or_workers for w in ids):
                raise ValueError(
                    f"faults.{i}.workers: worker ids must be < {self.max_workers_or_workers}"
                )
        return self

    def applied_optimizer(self) -> OptimizerSpec:
        """The optimizer the coordinator applies: ``optimizer``, with ``async``'s
        ``momentum_scaling: match_sync`` momentum (:func:`match_sync_momentum` over
        ``workers``) in place of its own."""
        mode, opt = self.mode, self.optimizer
        if not isinstance(mode, AsyncMode) or mode.momentum_scaling != "match_sync":
            return opt
        mu = match_sync_momentum(opt.momentum, self.workers)
        # torch's Nesterov needs a momentum
        return opt.model_copy(update={"momentum": mu, "nesterov": opt.nesterov and mu > 0})

    @property
    def max_workers_or_workers(self) -> int:
        return self.max_workers if self.max_workers is not None else self.workers

    def total_steps(self, n_train: int) -> int:
        """Steps to run: ``steps`` as given, or ``epochs`` over ``n_train`` samples."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        # one step consumes workers * batch_size samples
        return max(1, math.ceil(self.epochs * n_train / (self.workers * self.batch_size)))


def _allowed(err: Mapping[str, Any]) -> str:
    """What the user may give instead, from pydantic's error context."""
    ctx = err.get("ctx") or {}
    parts = []
    for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            parts.append(f"{sym} {ctx[key]}")
    if "expected" in ctx:
        parts.append(f"one of {ctx['expected']}")
    if "max_length" in ctx:
        unit = "items" if str(err.get("type", "")).startswith("too_long") else "characters"
        parts.append(f"at most {ctx['max_length']} {unit}")
    if "min_length" in ctx and str(err.get("type", "")).startswith("too_short"):
        parts.append(f"at least {ctx['min_length']} items")
    if "pattern" in ctx:
        parts.append(f"matching {ctx['pattern']}")
    return f" (allowed: {', '.join(parts)})" if parts else ""


def format_errors(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """Turn a pydantic error into ``(field.path, message + allowed range)`` pairs."""
    return format_error_list(exc.errors(), prefix)


_UNION_FIELDS = {"mode", "schedule"}
_UNION_TAGS = {
    *("sync", "elastic", "straggler", "async", "local"),
    *("constant", "warmup_cosine", "step"),
}


def format_error_list(
    errors: Sequence[Mapping[str, Any]], prefix: str = ""
) -> list[tuple[str, str]]:
    """:func:`format_errors` for error dicts already taken out of a ValidationError
    (FastAPI's request validation hands them over this way)."""
    problems = []
    for err in errors:
        parts = [str(p) for p in err["loc"] if p not in ("function-after",)]
        # pydantic puts the tag of a discriminated union in the path ("mode.elastic.beta");
        # the user wrote "mode.beta"
        parts = [
            p
            for i, p in enumerate(parts)
            if not (i > 0 and parts[i - 1] in _UNION_FIELDS and p in _UNION_TAGS)
        ]
        loc = ".".join(parts)
        path = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "spec")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (remove it, or check its spelling)"
        problems.append((path, msg + _allowed(err)))
    return problems


def parse_spec(data: Any) -> JobSpec:
    """Validate a mapping into a :class:`JobSpec`.

    Raises:
        SpecError: with one ``(field path, message)`` per problem.
    """
    if not isinstance(data, dict):
        raise SpecError([("spec", f"must be a mapping of fields, got {type(data).__name__}")])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_errors(exc)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML job spec file.

    Raises:
        SpecError: the file is missing, is not YAML, or holds an invalid spec.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError([("file", f"cannot read {p}: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([("file", f"{p} is not valid YAML: {exc}")]) from None
    return parse_spec(data)
