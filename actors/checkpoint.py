"""Checkpoints the coordinator can trust after a crash, and a journal of what it reported.

A checkpoint is one file ``ckpt-<step>.pt`` (a ``torch.save`` of plain tensors and lists)
whose SHA-256 is stored beside it in ``ckpt-<step>.sha256``. Both are written to a temporary
name, flushed to disk and renamed, so a reader sees either the whole file or none; a
checkpoint counts only if its checksum file exists and matches. :func:`latest_valid` walks
back from the newest one and skips (and reports) any that are partial or corrupt. A
rollback of the guard returns to an older one (:func:`latest_valid` with ``at_most``,
else :func:`oldest_valid`) and drops the newer ones (:func:`drop_after`).

The journal (``journal.jsonl``) holds every metric record and event the coordinator
produced, one JSON line each, so a restarted coordinator can hand back what its previous
incarnation had not delivered yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step``; keep the newest ``keep`` checkpoints.

    Returns:
        The checkpoint's path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = folder / f"ckpt-{step:010d}.pt"
    _atomic_write(path, data)
    _atomic_write(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())
    for old in list_checkpoints(folder)[:-keep]:
        _delete(old)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files, oldest first (valid or not)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


@dataclass
class Loaded:
    """A checkpoint that passed its checksum, and the ones skipped on the way to it."""

    path: Path
    step: int
    state: dict[str, Any]
    skipped: list[str]


def _load(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A checkpoint file's state if its checksum matches and it loads, else why not."""
    try:
        data = path.read_bytes()
        expected = path.with_suffix(".sha256").read_text().strip()
    except OSError as exc:
        return None, f"{path.name}: unreadable ({exc.strerror})"
    if hashlib.sha256(data).hexdigest() != expected:
        return None, f"{path.name}: checksum mismatch (partial or corrupt)"
    try:
        return torch.load(io.BytesIO(data), weights_only=False), ""
    except Exception as exc:  # noqa: BLE001 - any unreadable payload is skipped
        return None, f"{path.name}: cannot load ({exc})"


def checkpoint_step(path: Path) -> int:
    m = _NAME.match(path.name)
    assert m is not None, path
    return int(m.group(1))


def _first_valid(paths: Iterable[Path]) -> Loaded | None:
    """The first of ``paths`` whose checksum matches and that loads (with the ones skipped
    on the way to it); ``None`` if there is none."""
    skipped: list[str] = []
    for path in paths:
        state, why = _load(path)
        if state is None:
            skipped.append(why)
            continue
        return Loaded(path, checkpoint_step(path), state, skipped)
    return None


def latest_valid(folder: Path, at_most: int | None = None) -> Loaded | None:
    """The newest checkpoint whose checksum matches (of a step ``<= at_most`` when given);
    ``None`` if there is none."""
    paths = reversed(list_checkpoints(folder))
    return _first_valid(p for p in paths if at_most is None or checkpoint_step(p) <= at_most)


def oldest_valid(folder: Path) -> Loaded | None:
    """The oldest checkpoint whose checksum matches; ``None`` if there is none."""
    return _first_valid(list_checkpoints(folder))


def _delete(path: Path) -> None:
    """Delete checkpoint ``path`` and its checksum file (either may be gone already)."""
    for p in (path, path.with_suffix(".sha256")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def drop_after(folder: Path, step: int) -> list[str]:
    """Delete the checkpoints of steps after ``step`` (a trajectory a rollback abandoned:
    a restart must not resume it); returns their names."""
    gone = [p for p in list_checkpoints(folder) if checkpoint_step(p) > step]
    for path in gone:
        _delete(path)
    return [p.name for p in gone]


class Journal:
    """Append-only JSON lines of records and events (flushed at every :meth:`flush`)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a")  # noqa: SIM115 - kept open for the run

    def append(self, entry: dict[str, Any]) -> None:
        self._f.write(json.dumps(entry, default=str) + "\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """Every complete line of a journal (a torn last line is ignored)."""
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
