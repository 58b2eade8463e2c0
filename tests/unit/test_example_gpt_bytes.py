"""Unit tests for the gpt_bytes example task: the model's size and shapes, the corpus's
fixed split by file, the byte windows (indexing, boundaries, bounds), the index-only
memory of a dataset, and the read log the benchmark's memory check uses."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from gpt_bytes.data import (
    LOG_FLUSH_EVERY,
    ByteWindows,
    CorpusError,
    build_index,
    is_validation,
    list_sources,
    read_log,
    stdlib_root,
)
from gpt_bytes.model import GPT, n_parameters
from gpt_bytes.task import GPTBytesTask, GPTParams, build
from pydantic import ValidationError
from torch.utils.data import DataLoader

from actors.tasks.base import Task, TaskContext

pytestmark = pytest.mark.unit

TINY = GPTParams(n_layer=2, n_head=2, n_embd=16, block_size=16, dropout=0.0, max_files=30)
WORKER = TaskContext(seed=0, worker_id=0, data_dir=None, device=torch.device("cpu"))
COORD = TaskContext(seed=0, worker_id=None, data_dir=None, device=torch.device("cpu"))


def _stream(index_root: Path, files: tuple[str, ...]) -> bytes:
    return b"".join((index_root / f).read_bytes() for f in files)


def test_default_model_has_5_to_10_million_parameters() -> None:
    model = build(GPTParams()).build_model()
    # the count the module docstring and configs/gpt_bytes.yaml derive
    assert n_parameters(model) == 7_644_416
    assert 5_000_000 <= n_parameters(model) <= 10_000_000
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"LayerNorm", "Dropout", "Embedding", "CausalSelfAttention"} <= kinds


def test_build_is_a_task_and_forward_has_the_right_shapes() -> None:
    task = build(TINY)
    assert isinstance(task, Task) and isinstance(task, GPTBytesTask)
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.collate([task.train_data(WORKER)[i] for i in range(3)])
    assert batch.shape == (3, TINY.block_size + 1) and batch.dtype == torch.int64
    assert model(batch[:, :-1]).shape == (3, TINY.block_size, 256)
    # at initialisation (weights ~ N(0, 0.02)) the prediction is near uniform: ln 256
    loss = task.loss(model, batch)
    assert loss.ndim == 0 and abs(float(loss.detach()) - math.log(256)) < 0.1
    m = task.metrics(model, batch)
    assert m["bits_per_byte"] == pytest.approx(float(loss.detach()) / math.log(2), rel=1e-5)
    assert 0.0 <= m["accuracy"] <= 1.0


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = GPT(2, 2, 16, 16, dropout=0.0).eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256  # change only the future of position 9
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[0, :10], b[0, :10])
    assert not torch.equal(a[0, 10:], b[0, 10:])


def test_longer_than_block_size_is_refused() -> None:
    model = GPT(1, 1, 8, 8, dropout=0.0)
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.int64))


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError, match="multiple of n_head"):
        GPTParams(n_embd=30, n_head=4)
    with pytest.raises(ValidationError, match="n_layer"):
        GPTParams(n_layer=0)
    with pytest.raises(ValidationError, match="extra"):
        GPTParams.model_validate({"layers": 4})


def test_corpus_is_the_stdlib_without_site_packages_or_tests() -> None:
    files = list_sources(stdlib_root())
    assert files == sorted(files) and len(files) > 100
    assert "os.py" in files and "json/decoder.py" in files
    for f in files:
        parts = f.split("/")
        assert f.endswith(".py")
        assert not {"site-packages", "test", "tests", "__pycache__"} & set(parts[:-1]), f


def test_split_by_file_is_fixed_disjoint_and_covers_the_corpus() -> None:
    train, val = build_index("train", 0.1), build_index("val", 0.1)
    assert not set(train.files) & set(val.files)
    assert set(train.files) | set(val.files) <= set(list_sources(stdlib_root()))
    # every non-empty file is in one split
    non_empty = {f for f in list_sources(stdlib_root()) if (stdlib_root() / f).stat().st_size}
    assert set(train.files) | set(val.files) == non_empty
    # fixed: the hash of the path decides, again and again (no seed, no salt)
    assert build_index("val", 0.1) == val
    assert all(is_validation(f, 0.1) for f in val.files)
    assert 0.05 < len(val.files) / len(non_empty) < 0.15
    # a larger fraction only moves files into validation
    assert set(val.files) <= set(build_index("val", 0.3).files)


def test_split_does_not_depend_on_the_seed_or_the_worker() -> None:
    task = build(TINY)
    other = TaskContext(seed=7, worker_id=3, data_dir=None, device=torch.device("cpu"))
    assert task.train_data(WORKER).index == task.train_data(other).index
    assert task.eval_data(COORD).index == task.eval_data(other).index


def test_windows_are_consecutive_slices_of_the_split_stream() -> None:
    index = build_index("train", 0.1, max_files=30)
    ds = ByteWindows(index, block_size=64)
    stream = _stream(index.root, index.files)
    assert len(stream) == index.n_bytes
    assert len(ds) == (len(stream) - 1) // 64
    for i in (0, 1, len(ds) // 2, len(ds) - 1):
        assert bytes(ds[i].tolist()) == stream[i * 64 : i * 64 + 65]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_a_window_across_a_file_boundary(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_bytes(b"abcde")
    (tmp_path / "b.py").write_bytes(b"")  # empty files are left out
    (tmp_path / "c.py").write_bytes(b"fghijklmn")
    index = build_index("train", 1e-4, root=tmp_path)
    assert index.files == ("a.py", "c.py") and index.starts == (0, 5, 14)
    ds = ByteWindows(index, block_size=4)
    assert len(ds) == 3  # starts 0, 4, 8; a window needs 5 bytes
    assert [bytes(ds[i].tolist()) for i in range(3)] == [b"abcde", b"efghi", b"ijklm"]


def test_max_windows_spreads_the_evaluation_set_evenly() -> None:
    index = build_index("val", 0.1)
    full, few = ByteWindows(index, 32), ByteWindows(index, 32, max_windows=10)
    assert len(few) == 10
    starts = [few.window_start(i) for i in range(10)]
    assert starts == sorted(set(starts)) and starts[0] == 0
    assert starts[-1] > 0.8 * full.window_start(len(full) - 1)
    assert torch.equal(few[3], full[starts[3] // 32])


def test_bounds_on_the_corpus(tmp_path: Path) -> None:
    bounded = build_index("train", 0.1, max_bytes=100_000)
    # files are added until the stream holds max_bytes: the last one crosses the bound
    assert bounded.starts[-2] < 100_000 <= bounded.n_bytes
    assert len(build_index("train", 0.1, max_files=10).files) <= 10
    (tmp_path / "a.py").write_bytes(b"x" * 100)
    with pytest.raises(CorpusError, match="lower block_size"):
        ByteWindows(build_index("train", 1e-4, root=tmp_path), block_size=100)
    with pytest.raises(CorpusError, match="empty"):
        build_index("val", 1e-4, root=tmp_path)


def test_a_dataset_holds_an_index_not_the_text() -> None:
    ds = build(GPTParams()).train_data(WORKER)
    ds[0], ds[len(ds) - 1]
    # the training stream is megabytes; the pickled dataset (what a DataLoader worker
    # process gets) is the paths and offsets: a few tens of KB
    assert ds.index.n_bytes > 5_000_000
    assert len(pickle.dumps(ds)) < 100_000
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[5], ds[5])


def test_read_log_records_what_each_process_served(tmp_path: Path) -> None:
    params = TINY.model_copy(update={"read_log_dir": str(tmp_path)})
    task = build(params)
    ds = task.train_data(TaskContext(0, 1, None, torch.device("cpu")))
    for i in (3, 1, 3, 7):
        ds[i]
    ds.flush_log()
    ev = task.eval_data(COORD)
    ev[0]
    ev.flush_log()
    logs = {(r.who, r.split): r for r in read_log(tmp_path)}
    assert set(logs) == {("w1", "train"), ("coord", "val")}
    w1 = logs["w1", "train"]
    assert w1.indices == frozenset({1, 3, 7}) and w1.served == 4
    assert logs["coord", "val"].indices == frozenset({0})
    assert w1.peak_rss_kib is not None and w1.peak_rss_kib > 0
    # flushed without being asked every LOG_FLUSH_EVERY samples
    for i in range(LOG_FLUSH_EVERY):
        ds[i]
    assert max(r.served for r in read_log(tmp_path)) == 4 + LOG_FLUSH_EVERY


def test_a_dataloader_worker_process_reads_the_same_windows(tmp_path: Path) -> None:
    """Sent to a DataLoader worker process (pickled without its open files), the dataset
    serves the same bytes, and that process's reads are logged under its own pid."""
    params = TINY.model_copy(update={"read_log_dir": str(tmp_path)})
    ds = build(params).train_data(WORKER)
    order = [5, 0, 9, 2, 7, 3, 1, 8]
    loader = DataLoader(ds, batch_size=4, sampler=order, num_workers=1)
    batches = list(loader)
    assert torch.equal(torch.cat(batches), torch.stack([ds[i] for i in order]))
    del loader
    logged = [r for r in read_log(tmp_path) if r.pid != os.getpid()]
    # logged after each batch the loader fetched
    assert logged and logged[0].who == "w0" and logged[0].indices == frozenset(order)
