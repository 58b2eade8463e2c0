"""The corpus: the Python standard library's own ``.py`` sources, as byte windows.

Every machine that runs Python has this text, so the example needs no download. The files
are those under the running interpreter's stdlib directory (``sysconfig``'s ``stdlib``
path), minus ``site-packages`` (installed, not shipped, code), the standard library's own
test suites and ``__pycache__``; sorted by relative path, so two processes of one
interpreter see the same corpus. (Another Python version has other sources: the corpus is
fixed per interpreter, not across versions.)

**Split by file, fixed.** A file is in the validation set when a stable hash (BLAKE2b, not
Python's salted ``hash``) of its relative path falls below ``val_fraction``: the split
never depends on the job's seed, the number of workers or the file order, and a file's
bytes are in exactly one of the two sets.

**Samples.** Within one split the files are read as one stream, one file after another.
Sample ``i`` is the ``block_size + 1`` bytes starting at byte ``i * block_size`` of that
stream: inputs are its first ``block_size`` bytes, targets its last ``block_size`` (the
next byte of each). Windows may cross a file boundary, as in nanoGPT's single stream.

**Memory.** A :class:`ByteWindows` holds an *index*, not the text: the files' paths and
the stream offset where each starts (a few tens of KB for the ~700 files), and opens a
file only in ``__getitem__``, reading the window's bytes with ``os.pread`` (at most a few
file descriptors stay open, see :data:`OPEN_FILES`). A worker that reads only its shard's
indices therefore never holds more of the corpus than the windows of its current batch
(plus what the operating system caches in its shared page cache, which is not the
process's memory).

**Read log** (for the memory check of the benchmark and the tests). With ``read_log_dir``
set, each process appends the indices it served to ``<dir>/reads-<who>-<split>-<pid>.bin``
(int64, native order) and its peak resident memory to ``<dir>/rss-<who>-<split>-<pid>.txt``,
where ``who`` is ``w<id>`` for a worker and ``coord`` for the coordinator, every
:data:`LOG_FLUSH_EVERY` samples read one by one and after every batch a ``DataLoader``
fetches (``__getitems__``), so the log is complete up to the last batch served. See
:func:`read_log`.
"""

import array
import bisect
import contextlib
import hashlib
import os
import resource
import sysconfig
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from core.errors import ElasticSGDError

# Folders left out of the corpus: installed packages, the stdlib's test suites, byte code.
SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
# File descriptors a dataset keeps open (least recently used closed first): a batch of
# windows touches a handful of files, and a DataLoader worker process has its own set.
OPEN_FILES = 16
# Served indices buffered before an append to the read log (8 bytes each: 256 B a flush; one
# small append per 32 samples costs microseconds against a training step's milliseconds).
LOG_FLUSH_EVERY = 32
# Hash buckets of the split: val_fraction is resolved to 1/10000.
SPLIT_BUCKETS = 10_000

Split = Literal["train", "val"]


class CorpusError(ElasticSGDError, ValueError):
    """The corpus cannot be built with these settings (the message says which to change)."""


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_sources(root: Path) -> list[str]:
    """The ``.py`` files under ``root`` (relative POSIX paths, sorted), without the
    folders in :data:`SKIP_DIRS`."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        rel = Path(folder).relative_to(root)
        found.extend((rel / f).as_posix() for f in files if f.endswith(".py"))
    return sorted(found)


def is_validation(rel_path: str, val_fraction: float) -> bool:
    """Whether ``rel_path`` belongs to the validation split (a stable hash of the path)."""
    digest = hashlib.blake2b(rel_path.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SPLIT_BUCKETS < round(val_fraction * SPLIT_BUCKETS)


@dataclass(frozen=True)
class CorpusIndex:
    """The files of one split, in stream order, and where each starts in the stream.

    Attributes:
        split: ``train`` or ``val``.
        root: the folder the paths are relative to.
        files: relative paths, in stream order.
        starts: byte offset of each file in the split's stream; ``starts[-1]`` is the
            stream's length (so ``len(starts) == len(files) + 1``).
    """

    split: Split
    root: Path
    files: tuple[str, ...]
    starts: tuple[int, ...]

    @property
    def n_bytes(self) -> int:
        return self.starts[-1]


def build_index(
    split: Split,
    val_fraction: float,
    max_files: int | None = None,
    max_bytes: int | None = None,
    root: Path | None = None,
) -> CorpusIndex:
    """The index of one split of the corpus.

    Args:
        split: ``train`` or ``val``.
        val_fraction: the share of files (by hash of the path) that are validation files.
        max_files: keep at most this many files of the corpus (the first of the sorted
            list, *before* the split, so both splits come from one bounded corpus).
        max_bytes: stop adding files to this split once its stream holds this many bytes.
        root: the folder to read (default: :func:`stdlib_root`).

    Raises:
        CorpusError: the split has no bytes (a bound too tight, or a fraction of 0 or 1).
    """
    root = stdlib_root() if root is None else root
    paths = list_sources(root)
    if max_files is not None:
        paths = paths[:max_files]
    want_val = split == "val"
    files: list[str] = []
    starts = [0]
    for rel in paths:
        if is_validation(rel, val_fraction) != want_val:
            continue
        if max_bytes is not None and starts[-1] >= max_bytes:
            break
        size = (root / rel).stat().st_size
        if size == 0:
            continue
        files.append(rel)
        starts.append(starts[-1] + size)
    if starts[-1] == 0:
        raise CorpusError(
            f"the {split} split of {root} is empty (max_files={max_files}, "
            f"max_bytes={max_bytes}, val_fraction={val_fraction}); raise max_files or "
            "max_bytes, or pick a val_fraction strictly between 0 and 1"
        )
    return CorpusIndex(split, root, tuple(files), tuple(starts))


class ByteWindows(Dataset[torch.Tensor]):
    """``block_size + 1``-byte windows of a split's stream (see the module docstring).

    Args:
        index: the split's files.
        block_size: bytes of context per sample.
        max_windows: keep at most this many windows, evenly spaced over the stream (for an
            evaluation set that costs the same whatever the corpus size); ``None``: all.
        read_log_dir: where to log the served indices and peak memory (``None``: no log).
        who: the process's label in the read log (``w<id>`` or ``coord``).

    Raises:
        CorpusError: the stream is shorter than one window.
    """

    def __init__(
        self,
        index: CorpusIndex,
        block_size: int,
        max_windows: int | None = None,
        read_log_dir: Path | None = None,
        who: str = "coord",
    ) -> None:
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._served = array.array("q")
        self.index = index
        self.block_size = block_size
        # the last window needs block_size + 1 bytes from its start
        n_all = (index.n_bytes - 1) // block_size
        if n_all < 1:
            raise CorpusError(
                f"the split holds {index.n_bytes} bytes, less than one window of "
                f"{block_size + 1}; lower block_size or raise max_files / max_bytes"
            )
        self.n_all = n_all
        self.n = n_all if max_windows is None else min(n_all, max_windows)
        self.read_log_dir = read_log_dir
        self.who = who

    def __len__(self) -> int:
        return self.n

    def window_start(self, i: int) -> int:
        """Byte offset in the stream where sample ``i`` starts."""
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range for {self.n} windows")
        j = i if self.n == self.n_all else i * self.n_all // self.n
        return j * self.block_size

    def __getitem__(self, i: int) -> torch.Tensor:
        """Sample ``i``: ``block_size + 1`` bytes as int64 token ids in [0, 256)."""
        start = self.window_start(int(i))
        data = self._read(start, self.block_size + 1)
        if self.read_log_dir is not None:
            self._log(int(i))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        """A batch of samples (what a ``DataLoader`` asks for); the read log, if on, is
        flushed after each batch, so it is complete up to the last batch served."""
        out = [self[i] for i in indices]
        if self.read_log_dir is not None:
            self.flush_log()
        return out

    def _read(self, start: int, length: int) -> bytes:
        """``length`` bytes of the stream from ``start`` (across file ends if need be)."""
        starts, files = self.index.starts, self.index.files
        f = bisect.bisect_right(starts, start) - 1
        out = bytearray()
        pos = start
        while len(out) < length:
            if f >= len(files):
                raise CorpusError(f"window at {start} runs past the stream's end")
            want = min(length - len(out), starts[f + 1] - pos)
            chunk = os.pread(self._fd(f), want, pos - starts[f])
            if not chunk:  # the file shrank since it was indexed
                raise CorpusError(f"{files[f]} changed while training read it")
            out += chunk
            pos += len(chunk)
            if pos >= starts[f + 1]:
                f += 1
        return bytes(out)

    def _fd(self, f: int) -> int:
        fd = self._fds.get(f)
        if fd is None:
            fd = os.open(self.index.root / self.index.files[f], os.O_RDONLY)
            self._fds[f] = fd
            if len(self._fds) > OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(f)
        return fd

    def _log(self, i: int) -> None:
        self._served.append(i)
        if len(self._served) >= LOG_FLUSH_EVERY:
            self.flush_log()

    def flush_log(self) -> None:
        """Append the buffered served indices and the peak resident memory to the log."""
        if self.read_log_dir is None:
            return
        self.read_log_dir.mkdir(parents=True, exist_ok=True)
        split = "val" if self.index.split == "val" else "train"
        tag = f"{self.who}-{split}-{os.getpid()}"
        with open(self.read_log_dir / f"reads-{tag}.bin", "ab") as fh:
            self._served.tofile(fh)
        self._served = array.array("q")
        # ru_maxrss is in KiB on Linux
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (self.read_log_dir / f"rss-{tag}.txt").write_text(f"{peak_kib}\n")

    def __getstate__(self) -> dict[str, object]:
        """Pickled (to a DataLoader worker process) without the open file descriptors."""
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()
        state["_served"] = array.array("q")
        return state

    def __del__(self) -> None:
        # what is left since the last flush (best effort: at interpreter exit the builtins
        # may be gone, and a killed process runs no finaliser at all)
        if self._served:
            with contextlib.suppress(Exception):
                self.flush_log()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class ProcessReads:
    """What one process logged: who it was, of which split, the indices it served (and how
    many times it served one), its peak resident memory."""

    who: str
    split: str
    pid: int
    indices: frozenset[int]
    served: int
    peak_rss_kib: int | None


def read_log(folder: Path) -> list[ProcessReads]:
    """Everything the processes that served windows logged under ``folder``."""
    out: list[ProcessReads] = []
    for path in sorted(folder.glob("reads-*.bin")):
        tag = path.stem.removeprefix("reads-")
        who, split, pid = tag.split("-")
        served = array.array("q")
        served.frombytes(path.read_bytes())
        rss_path = folder / f"rss-{tag}.txt"
        rss = int(rss_path.read_text()) if rss_path.exists() else None
        out.append(ProcessReads(who, split, int(pid), frozenset(served), len(served), rss))
    return out
