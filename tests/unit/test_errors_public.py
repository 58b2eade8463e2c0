"""The public error of a job (service.public_errors): causes for users, no internals.

Built from real messages: Ray's own exception objects as ``ray.get`` raises them (made in
this process by ray_exception_objects, with the colour codes, pids and IPs Ray puts in),
the reasons the job manager writes, and a database written at schema 2.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
from ray_exception_objects import constructor_failed, remote

from core.errors import SpecError, TrainingFailed
from service.public_errors import MAX_PUBLIC_CHARS, NO_REASON, public_error
from service.ray_errors import user_error
from service.store import SCHEMA_VERSION, Store

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

LEAKS = ("\x1b[", "Traceback", 'File "', "pid=", "10.0.0.7", "/work/", "actor_id")

SHARDS = (
    "cannot cut 1437 training rows into 4096 non-empty shards; "
    "use fewer workers or a larger dataset"
)


def _clean(text: str) -> str:
    out = public_error(text)
    for leak in LEAKS:
        assert leak not in out, (leak, out)
    assert "\n" not in out and len(out) <= MAX_PUBLIC_CHARS
    return out


def test_a_remote_traceback_becomes_its_closing_exception() -> None:
    raw = str(remote(ValueError(SHARDS)))
    assert "\x1b[36m" in raw and "pid=4242" in raw and "Traceback" not in raw  # Ray's own form
    assert _clean(raw) == f"ValueError: {SHARDS}"


def test_the_words_before_a_traceback_are_kept() -> None:
    raw = "training failed: " + str(remote(TrainingFailed("0 live workers < min_workers=1")))
    assert _clean(raw) == "training failed: TrainingFailed: 0 live workers < min_workers=1"


def test_a_constructor_failure_names_the_cause_without_the_path() -> None:
    died = constructor_failed(FileNotFoundError(2, "No such file", "/srv/data/digits.npz"))
    out = _clean(f"could not start: {died}")
    assert out.startswith("could not start: The actor died because of an error raised")
    assert out.endswith("FileNotFoundError: [Errno 2] No such file: '<path>'")


def test_a_python_traceback_with_a_qualified_exception() -> None:
    raw = (
        "writing the job's outputs failed:\nTraceback (most recent call last):\n"
        '  File "/opt/esgd/service/runner.py", line 281, in finish\n'
        "    (self.out_dir / 'model.pt').write_bytes(self.model_bytes())\n"
        "core.errors.TrainingFailed: the disk of /var/lib/esgd/runs is full"
    )
    assert _clean(raw) == (
        "writing the job's outputs failed: TrainingFailed: the disk of <path> is full"
    )


def test_what_user_error_words_stays_as_it_is() -> None:
    said = str(user_error(remote(ValueError(SHARDS)), "the coordinator's scale failed"))
    assert public_error(said) == said


@pytest.mark.parametrize("nothing", [None, "", "None", "  \n ", "\x1b[31m\x1b[0m"])
def test_no_reason_becomes_one(nothing: str | None) -> None:
    assert public_error(nothing) == NO_REASON


def test_pids_ips_and_ids_are_dropped_routes_are_kept() -> None:
    raw = (
        "lost contact with coordinator esgd-coord-abc: 10 polls in a row failed; last error: "
        "ActorDiedError: The actor died unexpectedly (pid=31337, ip=192.168.4.20, "
        "actor_id=5a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d) on 192.168.4.20:6379; "
        "see GET /jobs/abc123/error"
    )
    out = _clean(raw)
    assert "31337" not in out and "192.168" not in out and "5a2b3c4d5e6f" not in out
    assert "on <ip>" in out and out.endswith("see GET /jobs/abc123/error")


def test_cut_to_two_sentences_and_a_length() -> None:
    raw = "The first. The second, e.g. this one. A third. A fourth."
    assert public_error(raw) == "The first. The second, e.g. this one."
    assert public_error("x" * 5000).endswith("…")
    assert len(public_error("word " * 2000)) == MAX_PUBLIC_CHARS


def test_the_spec_error_of_a_refused_path_keeps_its_cause() -> None:
    raw = str(SpecError([("dataset.path", "no file 'x.npz' in the data directory /srv/data")]))
    assert _clean(raw) == (
        "invalid job spec: dataset.path: no file 'x.npz' in the data directory <path>"
    )


def test_a_schema_2_database_keeps_the_full_text_and_sanitizes_the_public_one(
    tmp_path: Path,
) -> None:
    from service import store as store_module

    path = tmp_path / "db.sqlite3"
    v2 = store_module._SCHEMA.replace(
        "    error_detail TEXT,             -- the full text behind error (added in schema 3)\n",
        "",
    ).replace(
        "    guard TEXT,                    -- a guard event's action, or NULL"
        " (added in schema 4)\n",
        "",
    )
    assert "error_detail" not in v2
    raw = "could not start: " + str(remote(ValueError(SHARDS)))
    conn = sqlite3.connect(path)
    conn.executescript(v2)
    conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '2')")
    for job_id, error in (("bad", raw), ("ok", None)):
        conn.execute(
            "INSERT INTO jobs(id, name, state, created_at, updated_at, out_dir, error) "
            "VALUES (?, ?, ?, 1.0, 1.0, '/tmp/x', ?)",
            (job_id, job_id, "failed" if error else "succeeded", error),
        )
    conn.commit()
    conn.close()
    s = Store(path)
    try:
        assert s.schema_version == SCHEMA_VERSION == 4
        assert s.error_detail("bad") == (f"could not start: ValueError: {SHARDS}", raw)
        assert s.error_detail("ok") == (None, None)
        assert s.error_detail("nope") is None
        row = s.get_job("bad")
        assert row is not None and row.error == f"could not start: ValueError: {SHARDS}"
    finally:
        s.close()


@pytest.mark.parametrize(
    ("exc", "says"),
    [
        (RuntimeError("Symlink loop from '/srv/data/a'"), "symlink loop"),  # Python <= 3.12
        (OSError(errno.ELOOP, "Too many levels of symbolic links"), "symlink loop"),
        (OSError(errno.ENAMETOOLONG, "File name too long"), "File name too long"),
        (OSError(errno.EACCES, "Permission denied"), "Permission denied"),
        (ValueError("embedded null byte"), "NUL byte"),
    ],
)
def test_why_a_dataset_path_cannot_be_resolved(exc: BaseException, says: str) -> None:
    from service.jobs import _unusable_path

    message = _unusable_path(exc)
    assert says in message and "ESGD_DATA_DIR" in message and "/srv" not in message
