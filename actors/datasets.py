"""Datasets: every source is local and nothing is ever downloaded.

:func:`load_dataset` turns a :class:`DatasetSpec` into a :class:`Dataset`: float32 feature
rows standardised with *training* statistics, labels, and a fixed train/test split chosen
by the job's seed, so every worker and the coordinator that load the same spec hold
identical arrays. Sources:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images).
* ``synthetic_classification``: seeded ``make_classification``, separable enough that a
  linear model or an MLP reaches high accuracy.
* ``least_squares``: seeded Gaussian regression with a known exact optimum, so convergence
  can be measured as a distance to it.
* ``npz``: arrays ``x`` and ``y`` from a file *inside* the configured data directory.

:func:`loss_fn` and :func:`evaluate` give the training loss and the test metrics, so every
component computes them the same way.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ElasticSGDError
from core.spec import DatasetSpec

Task = Literal["classification", "regression"]

# A feature whose training std is below this fraction of its magnitude is constant up to
# float rounding; it is centred but not scaled (dividing would blow rounding noise up).
_CONSTANT_STD_RTOL = 1e-8
# make_classification: class centroids sit on hypercube vertices 2 * class_sep apart
# (sklearn's default is 1.0); 2.0 lets logreg reach >0.9 test accuracy on the defaults.
_CLASS_SEP = 2.0
# Rows per forward pass in :func:`evaluate` (bounds activation memory on big test sets).
_EVAL_BATCH_ROWS = 4096


class DatasetError(ElasticSGDError, ValueError):
    """A dataset cannot be loaded (the message names the ``dataset.*`` setting to change)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """One loaded, split and standardised dataset.

    Attributes:
        name: the spec's ``dataset.name``.
        task: ``classification`` (int64 class ids) or ``regression`` (float32 targets).
        x_train: float32 ``(n_train, n_features)``, standardised with train statistics.
        y_train: int64 class ids, or float32 ``(n_train,)`` targets.
        x_test: float32 ``(n_test, n_features)``, standardised with the *train* statistics.
        y_test: like ``y_train``.
        n_features: length of one row.
        n_outputs: number of classes, or 1 for regression.
        input_shape: image shape of a row (``(8, 8)`` for digits), else ``None``.
        optimum: ``least_squares`` only: the exact minimiser of the mean training loss
            ``0.5 * (x.w + b - y)^2``, laid out like the parameters of
            ``nn.Linear(n_features, 1)`` (weight row, then bias), float32 ``(n_features + 1,)``.
    """

    name: str
    task: Task
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_features: int
    n_outputs: int
    input_shape: tuple[int, ...] | None
    optimum: np.ndarray | None

    @property
    def n_train(self) -> int:
        """Number of training rows."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test rows."""
        return int(self.x_test.shape[0])


def _split(
    x: np.ndarray, y: np.ndarray, spec: DatasetSpec, seed: int, stratify: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/test split (stratified by class for classification)."""
    try:
        from sklearn.model_selection import train_test_split  # heavy: only where data loads

        parts: list[np.ndarray] = train_test_split(
            x,
            y,
            test_size=spec.test_fraction,
            random_state=seed,
            stratify=y if stratify else None,
        )
        x_tr, x_te, y_tr, y_te = parts
    except ValueError as exc:
        raise DatasetError(
            f"cannot split {len(y)} samples with dataset.test_fraction={spec.test_fraction}: "
            f"{exc} (use more samples, fewer classes or another test_fraction)"
        ) from exc
    return x_tr, x_te, y_tr, y_te


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale both parts with the training mean and std (constant columns: std 1)."""
    x_train = x_train.astype(np.float64, copy=False)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std <= _CONSTANT_STD_RTOL * np.maximum(1.0, np.abs(mean))] = 1.0

    def scale(a: np.ndarray) -> np.ndarray:
        out: np.ndarray = ((a.astype(np.float64, copy=False) - mean) / std).astype(np.float32)
        return out

    return scale(x_train), scale(x_test)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # heavy: workers import this module, not it

    x, y = load_digits(return_X_y=True)
    return x, y.astype(np.int64)


def _synthetic(spec: DatasetSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n_features, n_classes = spec.n_features, spec.n_classes
    # Half the features carry signal (at least 2), but make_classification also needs
    # n_classes <= 2 ** n_informative (one hypercube vertex per class).
    n_informative = max(min(n_features, max(2, n_features // 2)), math.ceil(math.log2(n_classes)))
    if n_informative > n_features:
        raise DatasetError(
            f"dataset.n_features={n_features} is too few for dataset.n_classes={n_classes}: "
            f"synthetic_classification needs n_features >= ceil(log2(n_classes)) = "
            f"{n_informative}"
        )
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=spec.n_samples,
        n_features=n_features,
        n_informative=n_informative,
        n_redundant=0,
        n_repeated=0,
        n_classes=n_classes,
        n_clusters_per_class=1,
        class_sep=_CLASS_SEP,
        flip_y=0.0,
        random_state=seed,
    )
    return x, y.astype(np.int64)


def _least_squares(spec: DatasetSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((spec.n_samples, spec.n_features))
    w_true = rng.standard_normal(spec.n_features)
    b_true = rng.standard_normal()
    y = x @ w_true + b_true + spec.noise * rng.standard_normal(spec.n_samples)
    return x, y.astype(np.float32)


def _least_squares_optimum(x_train: np.ndarray, y_train: np.ndarray) -> np.ndarray:
    """Exact minimiser of mean 0.5*(x.w + b - y)^2 over the float32 training rows.

    Solved in float64 on exactly the values the model sees, so standardisation cannot move
    it. Laid out as ``nn.Linear(n_features, 1).parameters()``: weight row, then bias.
    """
    design = np.hstack([x_train.astype(np.float64), np.ones((x_train.shape[0], 1))])
    theta, *_ = np.linalg.lstsq(design, y_train.astype(np.float64), rcond=None)
    return theta.astype(np.float32)


def _npz(spec: DatasetSpec, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Read arrays ``x`` and ``y`` from ``data_dir / spec.path``, refusing anything odd."""
    where = f"dataset.path {spec.path!r}"
    if data_dir is None or spec.path is None:
        raise DatasetError(f"{where}: no data directory is configured for npz datasets")
    base = Path(data_dir).resolve()
    target = (base / spec.path).resolve()  # follows symlinks
    if not target.is_relative_to(base):
        raise DatasetError(f"{where} resolves outside the data directory {base}")
    if not target.is_file():
        raise DatasetError(f"{where}: no such file in the data directory {base}")
    try:
        with np.load(target, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DatasetError(f"{where} is not an .npz archive")
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise DatasetError(f"{where} lacks array(s) {sorted(missing)}; it has {npz.files}")
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{where} cannot be read as .npz (no pickles allowed): {exc}") from exc
    _check_arrays(where, x, y)
    return x, y


def _check_arrays(where: str, x: np.ndarray, y: np.ndarray) -> None:
    """Refuse ``x``/``y`` arrays a model cannot train on (shapes, dtypes, non-finite)."""
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DatasetError(
            f"{where}: need x of shape (n, features...) and y of shape (n,), "
            f"got x {x.shape} and y {y.shape}"
        )
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise DatasetError(f"{where}: x must be finite numbers (dtype {x.dtype})")
    if np.issubdtype(y.dtype, np.integer):
        if y.size and y.min() < 0:
            raise DatasetError(f"{where}: integer labels y must be class ids >= 0")
    elif not np.issubdtype(y.dtype, np.floating) or not np.isfinite(y).all():
        raise DatasetError(f"{where}: y must be int class ids or finite floats, got {y.dtype}")


@dataclass(frozen=True)
class Shape:
    """What a model needs to know of a dataset without loading it.

    Attributes:
        n_samples: rows in the whole file or generated set (before the split).
        n_features: length of one flat row.
        n_outputs: number of classes, or 1 for regression.
        input_shape: image shape of a row, else ``None``.
    """

    n_samples: int
    n_features: int
    n_outputs: int
    input_shape: tuple[int, ...] | None


# scikit-learn's bundled digits: 1,797 images of 8x8 pixels, 10 classes
DIGITS_SHAPE = Shape(1797, 64, 10, (8, 8))


def npz_shape(path: Path) -> Shape:
    """The shape of an npz dataset from its arrays' headers (only ``y`` is read, for the
    number of classes); a file that cannot be read gives the smallest shape (the loader
    then says what is wrong with it)."""
    n_samples, n_features, n_outputs = 1, 1, 1
    input_shape: tuple[int, ...] | None = None
    try:
        with zipfile.ZipFile(path) as zf, zf.open("x.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, _ = read(f)
        n_samples = int(shape[0]) if shape else 1
        n_features = max(1, math.prod(int(s) for s in shape[1:]))
        if len(shape) == 3:
            input_shape = (int(shape[1]), int(shape[2]))
        with np.load(path, allow_pickle=False) as npz:
            y = npz["y"]
            if np.issubdtype(y.dtype, np.integer) and y.size:
                n_outputs = int(y.max()) + 1
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass
    return Shape(n_samples, n_features, n_outputs, input_shape)


def shape_of(spec: DatasetSpec, data_dir: Path | None = None) -> Shape:
    """The dataset's :class:`Shape` from the spec (and an npz file's headers), unloaded."""
    if spec.name == "digits":
        return DIGITS_SHAPE
    if spec.name == "npz":
        if data_dir is None or spec.path is None:
            return Shape(1, 1, 1, None)
        return npz_shape(Path(data_dir) / spec.path)
    outputs = spec.n_classes if spec.name == "synthetic_classification" else 1
    return Shape(spec.n_samples, spec.n_features, outputs, None)


def load_dataset(spec: DatasetSpec, seed: int, data_dir: Path | None = None) -> Dataset:
    """Load, split and standardise the dataset a job asks for.

    Args:
        spec: which dataset and its size; ``test_fraction`` sets the held-out share.
        seed: fixes the generated data and the train/test split.
        data_dir: the directory ``npz`` files must live in (unused by other sources).

    Returns:
        The dataset; identical for identical ``(spec, seed)`` on every process.

    Raises:
        DatasetError: (a ``ValueError``) the spec cannot be served: an ``npz`` path that is
            missing, escapes ``data_dir`` or holds bad arrays; too few samples to split;
            too few features for the classes.
    """
    input_shape: tuple[int, ...] | None = None
    if spec.name == "digits":
        x, y = _digits()
        input_shape = (8, 8)  # load_digits: 8x8 images, flattened to 64 features
    elif spec.name == "synthetic_classification":
        x, y = _synthetic(spec, seed)
    elif spec.name == "least_squares":
        x, y = _least_squares(spec, seed)
    elif spec.name == "npz":
        x, y = _npz(spec, data_dir)
        if x.ndim == 3:  # (n, H, W) images: remember the shape for the CNN
            input_shape = (int(x.shape[1]), int(x.shape[2]))
        x = x.reshape(x.shape[0], -1)
    else:
        raise DatasetError(f"dataset.name {spec.name!r} is unknown")

    task: Task = "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
    if task == "classification":
        y = y.astype(np.int64)
        n_outputs = int(y.max()) + 1
    else:
        y = y.astype(np.float32)
        n_outputs = 1
    x_tr, x_te, y_tr, y_te = _split(x, y, spec, seed, stratify=task == "classification")
    x_tr, x_te = _standardise(x_tr, x_te)
    optimum = _least_squares_optimum(x_tr, y_tr) if spec.name == "least_squares" else None
    return Dataset(
        name=spec.name,
        task=task,
        x_train=np.ascontiguousarray(x_tr),
        y_train=np.ascontiguousarray(y_tr),
        x_test=np.ascontiguousarray(x_te),
        y_test=np.ascontiguousarray(y_te),
        n_features=int(x_tr.shape[1]),
        n_outputs=n_outputs,
        input_shape=input_shape,
        optimum=optimum,
    )


def _cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``(n, classes)`` against class ids ``(n,)``."""
    return F.cross_entropy(output, target)


def _half_squared_error(output: Tensor, target: Tensor) -> Tensor:
    """Mean ``0.5 * (output - target)^2`` of predictions ``(n, 1)`` against targets ``(n,)``."""
    return 0.5 * (output.reshape(target.shape) - target).square().mean()


def loss_fn(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss of a task (module-level functions, so they pickle).

    Raises:
        ValueError: unknown task.
    """
    if task == "classification":
        return _cross_entropy
    if task == "regression":
        return _half_squared_error
    raise ValueError(f"unknown task {task!r}; expected 'classification' or 'regression'")


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, device: torch.device | str = "cpu") -> dict[str, float]:
    """Test metrics of ``model`` (which must already live on ``device``).

    Returns:
        ``test_loss`` (the training loss on the test set) and ``test_accuracy`` (NaN for
        regression); regression also gives ``test_mse`` (mean squared error, no 0.5).
    """
    loss = loss_fn(ds.task)
    loss_sum = correct = 0.0
    for start in range(0, ds.n_test, _EVAL_BATCH_ROWS):
        rows = slice(start, start + _EVAL_BATCH_ROWS)
        x = torch.from_numpy(ds.x_test[rows]).to(device)
        y = torch.from_numpy(ds.y_test[rows]).to(device)
        out = model(x)
        loss_sum += float(loss(out, y)) * len(y)
        if ds.task == "classification":
            correct += float((out.argmax(dim=1) == y).sum())
    n = max(ds.n_test, 1)
    metrics = {"test_loss": loss_sum / n}
    if ds.task == "classification":
        metrics["test_accuracy"] = correct / n
    else:
        metrics["test_accuracy"] = math.nan
        metrics["test_mse"] = 2.0 * loss_sum / n  # the loss is half the squared error
    return metrics
