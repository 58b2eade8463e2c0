"""What a user may read of a job's failure: the cause, and the setting to change.

A job's reason to fail comes from many places (the supervisor's own sentences, the
coordinator's status, what a Ray call raised) and some of them carry a remote traceback:
ANSI colour codes, file paths of the service's machine, pids, IPs and actor ids. The full
text is kept for operators (``jobs.error_detail``, served behind the token by
``GET /jobs/{id}/error``, and written to the server log); what is stored as the job's
public ``error`` is :func:`public_error` of it, the one function that sanitizes it:

* ANSI codes are stripped; a Python traceback is reduced to its closing ``Type: message``,
  the words before it kept (``could not start: ValueError: ...``);
* absolute file paths become ``<path>``, IPv4 addresses ``<ip>``, pids and long hex ids
  are dropped (HTTP routes such as ``GET /jobs/{id}`` are kept: they are advice);
* the text is one line of at most two sentences and :data:`MAX_PUBLIC_CHARS` characters;
* an empty reason (``None``, ``""``, the string ``"None"``) becomes :data:`NO_REASON`,
  so that a failed job always says why, or at least where to look.
"""

from __future__ import annotations

import re

# Said when no reason reached the service (a coordinator that ended FAILED without one).
NO_REASON = (
    "the job failed without a reason from its coordinator; the full record is at "
    "GET /jobs/{id}/error (with the token) and in the server log"
)
# Two sentences of a table cell or a CLI line; a longer cause is cut with an ellipsis.
MAX_PUBLIC_CHARS = 400

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TRACEBACK_START = re.compile(
    r"Traceback \(most recent call last\):|ray::[\w.]+\(\)|^\s*File \"", re.MULTILINE
)
# "(pid=4242, ip=10.0.0.7, actor_id=..., repr=...)" after a Ray process title
_RAY_PROC = re.compile(r"\s*\((?:pid|ip|actor_id)=[^()]*(?:\([^()]*\)[^()]*)*\)")
_PID = re.compile(r"[,;]?\s*\bpid[=: ]\s*\d+", re.IGNORECASE)
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b")
_HEX_ID = re.compile(r"\b[0-9a-fA-F]{24,}\b")
# an absolute path of two or more parts, unless it is an HTTP route after its method
_PATH = re.compile(r"(?<!GET )(?<!POST )(?<!PUT )(?<!DELETE )(?<![\w.:/~])(?:/[\w.+@%-]+){2,}/?")
_HOME_PATH = re.compile(r"(?<![\w/])~/[\w./+@%-]*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
# "core.errors.SpecError: ..." -> "SpecError: ..."
_QUALIFIED = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*(?::|$))")


def public_error(text: object) -> str:
    """The public ``error`` of a job for a failure reason ``text`` (see the module's rules).

    Args:
        text: the reason as it reached the service (any object; ``None`` and ``"None"``
            mean no reason).

    Returns:
        One line, at most two sentences, without ANSI codes, paths, pids, IPs or tracebacks.
    """
    raw = "" if text is None else str(text)
    clean = _ANSI.sub("", raw).replace("\x00", "")
    clean = _without_traceback(clean)
    clean = _RAY_PROC.sub("", clean)
    clean = _PID.sub("", clean)
    clean = _IPV4.sub("<ip>", clean)
    clean = _HEX_ID.sub("", clean)
    clean = _PATH.sub("<path>", clean)
    clean = _HOME_PATH.sub("<path>", clean)
    clean = " ".join(clean.split())
    if not clean or clean in ("None", "null"):
        return NO_REASON
    return _cut(_two_sentences(clean))


def _without_traceback(text: str) -> str:
    """``text`` with a traceback in it replaced by the exception that closes it."""
    m = _TRACEBACK_START.search(text)
    if m is None:
        return text
    head = text[: m.start()].rstrip().rstrip(",;:")
    closing = _closing_exception(text[m.start() :])
    return f"{head}: {closing}" if head else closing


def _closing_exception(tb: str) -> str:
    """The ``Type: message`` after a traceback's last frame (its last lines)."""
    lines = tb.splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    rest = lines[frames[-1] + 1 :] if frames else lines[1:]
    # a frame's source line and caret marks are indented; the exception starts at column 0
    while rest and (rest[0].startswith(" ") or not rest[0].strip()):
        rest = rest[1:]
    text = " ".join(line.strip() for line in rest if line.strip())
    return _QUALIFIED.sub("", text)


def _two_sentences(text: str) -> str:
    parts = _SENTENCE_END.split(text)
    return " ".join(parts[:2])


def _cut(text: str) -> str:
    if len(text) <= MAX_PUBLIC_CHARS:
        return text
    return text[: MAX_PUBLIC_CHARS - 1].rstrip() + "…"
