"""A low-latency request/reply channel between the coordinator and a same-host worker.

A Ray actor call costs about a millisecond each way here, more than the whole
coordinator-side work of a step on a small model, and it is paid twice per worker per step.
Workers that share the coordinator's host therefore get a pair of named pipes (FIFOs) in the
job's shared-memory folder: the coordinator writes a small request frame (step, view
handle, flags), the worker's serving loop computes and writes a small reply frame; the
gradient itself is already in the worker's shared-memory slot. Ray still owns the actors:
the serving loop is an actor method, so a worker's death surfaces as that call failing.

Frames are a 4-byte little-endian length followed by a pickle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
from collections.abc import Callable
from typing import Any

_LEN = struct.Struct("<I")


def make_pair(folder: str, worker: int) -> tuple[str, str]:
    """Create the request and reply FIFOs of one worker; returns their paths."""
    req = os.path.join(folder, f"req{worker}")
    rep = os.path.join(folder, f"rep{worker}")
    for p in (req, rep):
        if os.path.exists(p):
            os.unlink(p)
        os.mkfifo(p, 0o600)
    return req, rep


def encode(msg: Any) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class FrameReader:
    """Reassembles frames from a byte stream."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if len(self._buf) < _LEN.size + n:
                break
            out.append(pickle.loads(bytes(self._buf[_LEN.size : _LEN.size + n])))
            del self._buf[: _LEN.size + n]
        return out


class CoordinatorEnd:
    """The coordinator's end of one worker's channel, driven by the asyncio loop.

    Both FIFOs are opened read-write so that opening never blocks and the order in which
    the two processes open them does not matter. Replies are handed to ``on_reply``.
    """

    def __init__(self, req_path: str, rep_path: str, on_reply: Callable[[Any], None]) -> None:
        self.req_fd = os.open(req_path, os.O_RDWR)
        self.rep_fd = os.open(rep_path, os.O_RDWR | os.O_NONBLOCK)
        self._reader = FrameReader()
        self._on_reply = on_reply
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.rep_fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.rep_fd, 1 << 20)
        except BlockingIOError:
            return
        for msg in self._reader.feed(data):
            self._on_reply(msg)

    def send(self, msg: Any) -> None:
        _write_all(self.req_fd, encode(msg))

    def close(self) -> None:
        self._loop.remove_reader(self.rep_fd)
        for fd in (self.req_fd, self.rep_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def serve(
    req_path: str,
    rep_path: str,
    handle: Callable[[Any], Any],
    bind_emit: Callable[[Callable[[Any], None]], None] | None = None,
) -> int:
    """The worker's loop: read a request, reply ``handle(request)``, until a ``None``.

    Args:
        req_path: the request FIFO.
        rep_path: the reply FIFO.
        handle: computes a request's reply.
        bind_emit: given a function that writes one extra frame to the reply FIFO (the
            coordinator's ``on_reply`` gets it, in order, before the reply): ``handle`` may
            call it while it computes (per-block gradient announcements).

    Returns:
        The number of requests served.
    """
    req = os.open(req_path, os.O_RDONLY)
    rep = os.open(rep_path, os.O_WRONLY)
    if bind_emit is not None:
        bind_emit(lambda msg: _write_all(rep, encode(msg)))
    reader = FrameReader()
    served = 0
    try:
        while True:
            data = os.read(req, 1 << 16)
            if not data:
                return served
            for msg in reader.feed(data):
                if msg is None:
                    return served
                _write_all(rep, encode(handle(msg)))
                served += 1
    finally:
        os.close(req)
        os.close(rep)
