"""The built-in task: the registry's models (actors/models.py) on the local datasets
(actors/datasets.py), behind the same :class:`~actors.tasks.base.Task` interface as a user's.

A job without a ``task`` section trains this task, with the spec's ``model`` and ``dataset``
sections as its params: the same samples, loss and metrics as before tasks existed.

* data: the dataset's standardised rows as a :class:`TensorRows` (map-style; a sample is
  ``(x_row, y)``), split by the job's seed. The first process on a host generates them (or
  reads the npz file) and leaves the arrays in a host-local cache; the others memory-map
  them and read only their batches' rows (:func:`cached_dataset`); nothing crosses Ray.
* loss: cross-entropy for integer labels, ``0.5 * (prediction - target)^2`` for float
  targets (:func:`actors.datasets.loss_fn`, picked from the labels as before).
* metrics: ``accuracy`` (NaN for regression, so a chart of ``test_accuracy`` keeps one
  meaning) and, for regression, ``mse`` (the plain mean squared error, no 0.5).
* ``least_squares`` knows its exact optimum (:attr:`BuiltinTask.optimum`): the coordinator
  reports the distance of the model of record to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset

from actors.datasets import Dataset, Shape, load_dataset, loss_fn, shape_of
from actors.models import build_model
from actors.tasks.base import Task, TaskContext
from core.spec import DatasetSpec, ModelSpec

# The entrypoint that names this task (what a spec without ``task`` stands for).
BUILTIN_ENTRYPOINT = "actors.tasks.builtin:BuiltinTask"


class BuiltinParams(BaseModel):
    """The built-in task's params: the spec's ``model`` and ``dataset`` sections."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)


class TensorRows(TorchDataset[tuple[Tensor, Tensor]]):
    """Rows of two aligned arrays, one sample ``(x[i], y[i])`` per index.

    The arrays may be memory-mapped (:func:`cached_dataset`): a batch reads only its rows.
    ``__getitems__`` hands a whole batch over in one indexing (the DataLoader's fetcher uses
    it), and :meth:`BuiltinTask.collate` keeps it as it is: the same tensors that
    ``x[indices]`` gives, without a per-row stack.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(np.array(self.x[i])), torch.from_numpy(np.array(self.y[i]))

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(np.asarray(self.x[idx])), torch.from_numpy(np.asarray(self.y[idx]))


_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "optimum")
# Datasets larger than this are not cached (each process loads them itself): 256 MiB is
# 4x the largest shipped config's data (digits: 0.5 MB).
MAX_CACHE_BYTES = 256 << 20
# The whole cache of a host: past this, the entries used longest ago are deleted after each
# write (a process that has one memory-mapped keeps reading it: Linux frees the files when
# the last map goes); an entry unused for CACHE_MAX_AGE_S is deleted too.
MAX_CACHE_TOTAL_BYTES = 1 << 30
CACHE_MAX_AGE_S = 7 * 24 * 3600.0


def _cache_key(spec: DatasetSpec, seed: int, data_dir: Path | None) -> str:
    """What the loaded dataset is a function of: the spec, the seed, and for an npz file
    its path, size and modification time (a changed file is loaded again)."""
    parts: dict[str, Any] = {"spec": spec.model_dump(mode="json"), "seed": seed}
    if spec.name == "npz" and data_dir is not None and spec.path is not None:
        f = Path(data_dir) / spec.path
        st = f.stat() if f.is_file() else None
        parts["file"] = [str(f.resolve()), st.st_size if st else 0, st.st_mtime_ns if st else 0]
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def cached_dataset(
    spec: DatasetSpec, seed: int, data_dir: Path | None, cache_dir: Path | None
) -> Dataset:
    """The loaded dataset, from this host's cache when an earlier process left it there.

    The first process of a job on a host (the coordinator, which starts first) loads the
    dataset (:func:`actors.datasets.load_dataset`) and writes its arrays as ``.npy`` files
    (atomically: a folder renamed into place); the others memory-map them, so a worker
    reads only the rows of its batches and needs neither scikit-learn nor the generator.
    Without a cache folder (or when it cannot be written, or the dataset is larger than
    :data:`MAX_CACHE_BYTES`) every process loads it itself.
    """
    if cache_dir is None:
        return load_dataset(spec, seed, data_dir)
    where = cache_dir / _cache_key(spec, seed, data_dir)
    meta_file = where / "meta.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            os.utime(meta_file)  # used now: the last to go when the cache is pruned
            arrays = {
                k: np.load(where / f"{k}.npy", mmap_mode="r", allow_pickle=False)
                for k in _ARRAYS
                if (where / f"{k}.npy").is_file()
            }
            shape = meta["input_shape"]
            return Dataset(
                name=meta["name"],
                task=meta["task"],
                x_train=arrays["x_train"],
                y_train=arrays["y_train"],
                x_test=arrays["x_test"],
                y_test=arrays["y_test"],
                n_features=int(meta["n_features"]),
                n_outputs=int(meta["n_outputs"]),
                input_shape=None if shape is None else tuple(shape),
                optimum=None if "optimum" not in arrays else np.array(arrays["optimum"]),
            )
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry: load it again
    ds = load_dataset(spec, seed, data_dir)
    _write_cache(where, ds)
    return ds


def _write_cache(where: Path, ds: Dataset) -> None:
    """Write ``ds`` under ``where`` atomically; a failure only costs the next process time."""
    if sum(getattr(ds, k).nbytes for k in _ARRAYS if getattr(ds, k) is not None) > (
        MAX_CACHE_BYTES
    ):
        return
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=where.name + ".", dir=where.parent))
        for k in _ARRAYS:
            a = getattr(ds, k)
            if a is not None:
                np.save(tmp / f"{k}.npy", np.ascontiguousarray(a), allow_pickle=False)
        meta = {
            "name": ds.name,
            "task": ds.task,
            "n_features": ds.n_features,
            "n_outputs": ds.n_outputs,
            "input_shape": None if ds.input_shape is None else list(ds.input_shape),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, where)
        except OSError:  # another process was first: its copy is the same
            shutil.rmtree(tmp, ignore_errors=True)
        prune_cache(where.parent, keep=where.name)
    except OSError:
        return


def prune_cache(
    cache_dir: Path,
    keep: str | None = None,
    max_bytes: int = MAX_CACHE_TOTAL_BYTES,
    max_age_s: float = CACHE_MAX_AGE_S,
) -> list[str]:
    """Delete the cache's entries unused for ``max_age_s``, then the ones used longest ago
    until the rest fit in ``max_bytes`` (never ``keep``, the one just written); returns the
    names deleted. Half-written folders (no ``meta.json``) older than an hour go too."""
    now = time.time()
    entries: list[tuple[float, int, Path]] = []
    for d in cache_dir.iterdir() if cache_dir.is_dir() else []:
        meta = d / "meta.json"
        try:
            if not meta.is_file():
                if d.is_dir() and now - d.stat().st_mtime > 3600:
                    shutil.rmtree(d, ignore_errors=True)
                continue
            size = sum(f.stat().st_size for f in d.iterdir())
            entries.append((meta.stat().st_mtime, size, d))
        except OSError:
            continue  # deleted meanwhile by another process
    entries.sort()  # used longest ago first
    total = sum(size for _, size, _ in entries)
    gone: list[str] = []
    for used, size, d in entries:
        if d.name == keep or (total <= max_bytes and now - used <= max_age_s):
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= size
        gone.append(d.name)
    return gone


def default_cache_dir() -> Path:
    """This host's dataset cache (under the temporary folder; one per user)."""
    return Path(tempfile.gettempdir()) / f"esgd-datasets-{os.getuid()}"


class BuiltinTask(Task):
    """See the module docstring.

    Args:
        params: the model and dataset sections.
        data_dir: where ``npz`` datasets are (``ESGD_DATA_DIR``); only the shape of the
            model is read from it in :meth:`build_model`, the data through the context.
        cache_dir: this host's dataset cache (:func:`cached_dataset`; default under the
            temporary folder).
    """

    def __init__(
        self,
        params: BuiltinParams,
        data_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.params = params
        self.data_dir = data_dir
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self._ds: Dataset | None = None
        self._seed: int | None = None

    def data(self, ctx: TaskContext) -> Dataset:
        """The loaded dataset (once per task object and seed)."""
        if self._ds is None or self._seed != ctx.seed:
            self._ds = cached_dataset(
                self.params.dataset, ctx.seed, ctx.data_dir or self.data_dir, self.cache_dir
            )
            self._seed = ctx.seed
        return self._ds

    @property
    def regression(self) -> bool:
        return self._ds is not None and self._ds.task == "regression"

    @property
    def optimum(self) -> np.ndarray | None:
        """``least_squares``: the exact minimiser, laid out as the parameters (else None)."""
        return None if self._ds is None else self._ds.optimum

    def build_model(self) -> nn.Module:
        ds = self._ds
        shape = (
            shape_of(self.params.dataset, self.data_dir)
            if ds is None  # the spec (and an npz file's headers) give the widths
            else Shape(ds.n_train, ds.n_features, ds.n_outputs, ds.input_shape)
        )
        return build_model(self.params.model, shape.n_features, shape.n_outputs, shape.input_shape)

    def train_data(self, ctx: TaskContext) -> TensorRows:
        ds = self.data(ctx)
        return TensorRows(ds.x_train, ds.y_train)

    def eval_data(self, ctx: TaskContext) -> TensorRows:
        ds = self.data(ctx)
        return TensorRows(ds.x_test, ds.y_test)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        out = model(x)
        task = "regression" if y.is_floating_point() else "classification"
        return loss_fn(task)(out, y)

    def metrics(self, model: nn.Module, batch: Any) -> dict[str, float]:
        x, y = batch
        out = model(x)
        n = max(len(y), 1)
        if y.is_floating_point():  # in float64: the mean of n float32 errors, not rounded
            err = (out.reshape(y.shape).double() - y.double()).square().sum()
            return {"accuracy": math.nan, "mse": float(err) / n}
        return {"accuracy": int((out.argmax(dim=1) == y).sum()) / n}  # an exact k / n

    def collate(self, samples: Any) -> Any:
        """A batch from :meth:`TensorRows.__getitems__` is already one; rows are stacked."""
        if isinstance(samples, tuple):
            return samples
        return super().collate(samples)
