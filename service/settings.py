"""Service settings: the one place where the service's configuration enters.

Every value comes from an ``ESGD_``-prefixed environment variable (or the constructor, in
tests and in ``elastic-sgd serve``'s flags) and is validated once, here. Unsafe values are
refused with a message that names the setting to change: above all, the server will not
listen beyond loopback without a bearer token (:attr:`Settings.token`).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.errors import ElasticSGDError
from core.spec import format_errors
from service.store import Retention

if TYPE_CHECKING:
    from service.budget import Budgets


# the built-in tasks and the example packages under examples/
DEFAULT_TASK_MODULES = ("actors.tasks", "gpt_bytes", "cnn_digits")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SettingsError(ElasticSGDError):
    """A service setting was refused (unsafe or out of range)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = [f"{path}: {msg}" for path, msg in problems]
        super().__init__("invalid service settings:\n  " + "\n  ".join(lines))

    def __reduce__(self) -> tuple[type[SettingsError], tuple[list[tuple[str, str]]]]:
        return (SettingsError, (self.problems,))


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # A host name other than localhost may resolve to anything: treat it as public.
        return False


# A token is sent in an HTTP header: visible ASCII (0x21-0x7e), no spaces or control codes.
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))
MIN_TOKEN_CHARS = 16
# 8 distinct characters: "aaaaaaaaaaaaaaaa" or "abababab..." are not secrets
MIN_TOKEN_DISTINCT = 8


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot serve as the bearer token, or ``None`` if it can.

    A token must be printable ASCII without spaces (anything else cannot be sent in an
    ``Authorization`` header, so it could never match), at least
    :data:`MIN_TOKEN_CHARS` long, with at least :data:`MIN_TOKEN_DISTINCT` distinct characters.
    """
    fix = "set ESGD_TOKEN (or --token) to a long random string, e.g. `openssl rand -hex 24`"
    bad = sorted({c for c in token if c not in _TOKEN_CHARS})
    if bad:
        shown = ", ".join(f"U+{ord(c):04X}" for c in bad[:5])
        return (
            f"token (ESGD_TOKEN) may hold only printable ASCII without spaces; it holds "
            f"{shown}, which an Authorization header cannot carry: {fix}"
        )
    if len(token) < MIN_TOKEN_CHARS:
        return f"token (ESGD_TOKEN) is too short: use at least {MIN_TOKEN_CHARS} characters; {fix}"
    if len(set(token)) < MIN_TOKEN_DISTINCT:
        return (
            f"token (ESGD_TOKEN) has only {len(set(token))} distinct characters: use at least "
            f"{MIN_TOKEN_DISTINCT}; {fix}"
        )
    return None


class Settings(BaseSettings):
    """Configuration of the elastic-sgd service (env prefix ``ESGD_``)."""

    model_config = SettingsConfigDict(
        env_prefix="ESGD_", extra="forbid", validate_default=True, populate_by_name=True
    )

    # SQLite database, job outputs (metrics.jsonl, model.pt, summary.json) and logs.
    state_dir: Path = Path(".state")
    # Directory that ``dataset.path`` of ``npz`` specs is resolved inside (never outside).
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # Bearer token required on every mutating route; None disables auth (loopback only).
    token: SecretStr | None = None
    # 1 MiB: a job spec is a few KiB; this leaves room for long fault plans.
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    # Ray cluster to use (``host:port``, ``auto``, ``ray://...``); None (unset or empty)
    # starts Ray in-process. The rule, and the order of the two variables, are those of
    # service.ray_conn (the first variable set wins).
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("ESGD_RAY_ADDRESS", "RAY_ADDRESS")
    )
    # How often the supervisor polls each job's coordinator for metrics and events.
    poll_interval_s: float = Field(default=0.5, gt=0.0, le=60.0)
    # Seconds a started job may take to report its first status before it is failed.
    start_timeout_s: float = Field(default=120.0, gt=0.0, le=3600.0)
    # Jobs with actors in Ray at once; more wait in pending. 0 pauses admission (jobs are
    # accepted and wait), e.g. for maintenance.
    max_running_jobs: int = Field(default=8, ge=0, le=10_000)
    # Consecutive failed polls of a live job before it is declared failed (bounded retry).
    max_poll_failures: int = Field(default=10, ge=1, le=10_000)
    # Live streams (GET /jobs/{id}/stream) open at once, all jobs together; past it a new
    # one is refused with 429. They share one reader of the store per job; each holds a
    # queue of at most 2,048 items (api.streams). 0 turns streams off.
    max_stream_subscribers: int = Field(default=64, ge=0, le=100_000)

    # -- budgets (service.budget): defaults keep a 2-core, 24 GB machine alive -------------
    # One job's estimated memory. 8 GiB: a third of 24 GB, so a runaway job leaves the OS,
    # the service and another job room; a default job (4 workers) is about 1.2 GiB.
    job_memory_bytes: int = Field(default=8 << 30, ge=64 << 20, le=1 << 50)
    # All live jobs' estimated memory together. 16 GiB: two thirds of 24 GB; the rest is
    # the OS, the service, Ray's own processes and its object store.
    service_memory_bytes: int = Field(default=16 << 30, ge=64 << 20, le=1 << 50)
    # Workers of one job (``max_workers``, or ``workers``). 64: each worker is a process of
    # about 220 MiB (service.budget.WORKER_BASE_BYTES); 64 of them are 14 GiB.
    job_workers: int = Field(default=64, ge=1, le=4096)
    # Actor processes of all live jobs together (workers + one coordinator each). 128: Ray
    # runs one process per actor, so this caps what a few cores time-share (4096 workers of
    # 0.0001 CPU had started ~150 processes and eaten 17 GB before any trained).
    service_processes: int = Field(default=128, ge=2, le=100_000)
    # Seconds between two sweeps for actors of the service's namespace that belong to no
    # live job (they are killed, with a ``reap`` event on their job).
    reap_interval_s: float = Field(default=30.0, gt=0.0, le=86_400.0)
    # Seconds a cancel waits for the coordinator to answer before the job's actors are
    # killed by name (a restarting coordinator answers nothing).
    cancel_timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)

    # -- retention (service.store.Retention; docs/deploy.md "Retention") -------------------
    # Checkpoint rows and checkpoint events kept per job (the newest). 1000: a day of a
    # checkpoint every 90 s; the files on disk are ``checkpoint.keep`` of the spec.
    checkpoint_records_keep: int = Field(default=1000, ge=1, le=10_000_000)
    # Step records per job at full resolution; older ones are thinned to every second
    # record past it. 200,000: a 100,000-step job is kept whole (about 60 MB of rows).
    step_records_keep: int = Field(default=200_000, ge=2, le=1_000_000_000)

    # -- tasks (service.tasks, docs/tasks.md) ----------------------------------------------
    # Module prefixes whose tasks the service may import (comma-separated in the
    # environment); an entrypoint outside them is refused before anything is imported.
    # Default: the built-in tasks and the two example packages shipped under examples/.
    task_modules: Annotated[tuple[str, ...], NoDecode] = DEFAULT_TASK_MODULES
    # Ray runtime_env of every job's actors: local package directories shipped to the
    # workers as ``py_modules`` (comma-separated), and a ``working_dir``. The service also
    # imports tasks from them to validate a submission.
    runtime_env_py_modules: Annotated[tuple[Path, ...], NoDecode] = ()
    runtime_env_working_dir: Path | None = None

    @field_validator("task_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        for m in value:
            if not isinstance(m, str) or not _MODULE_RE.match(m):
                raise ValueError(
                    f"task_modules (ESGD_TASK_MODULES): {m!r} is not a dotted module path "
                    "(e.g. my_company.tasks); separate several with commas"
                )
        return value

    @field_validator("runtime_env_py_modules", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("runtime_env_py_modules")
    @classmethod
    def _dirs_exist(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        for p in value:
            if not p.is_dir():
                raise ValueError(
                    f"runtime_env_py_modules (ESGD_RUNTIME_ENV_PY_MODULES): {str(p)!r} is not "
                    "a directory; give the directory of each package to ship (its name is "
                    "the module's)"
                )
        return tuple(p.resolve() for p in value)

    @field_validator("runtime_env_working_dir")
    @classmethod
    def _working_dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(
                f"runtime_env_working_dir (ESGD_RUNTIME_ENV_WORKING_DIR): {str(value)!r} is "
                "not a directory"
            )
        return None if value is None else value.resolve()

    @property
    def import_paths(self) -> list[Path]:
        """Where the service imports shipped tasks from: each ``py_modules`` package's
        parent, and the working directory."""
        paths = [p.parent for p in self.runtime_env_py_modules]
        if self.runtime_env_working_dir is not None:
            paths.append(self.runtime_env_working_dir)
        return paths

    @field_validator("ray_address")
    @classmethod
    def _empty_address_is_none(cls, value: str | None) -> str | None:
        return None if value is None else value.strip() or None

    @model_validator(mode="after")
    def _refuse_public_without_token(self) -> Settings:
        if not is_loopback(self.host) and self.token is None:
            raise ValueError(
                f"host {self.host!r} is reachable beyond this machine but no token is set: "
                "set ESGD_TOKEN (or --token) to a long random string, or use "
                "ESGD_HOST=127.0.0.1"
            )
        if self.token is not None:
            problem = token_problem(self.token.get_secret_value())
            if problem is not None:
                raise ValueError(problem)
        return self

    def retention(self) -> Retention:
        """What the store keeps of each job's history."""
        return Retention(
            checkpoint_records=self.checkpoint_records_keep, step_records=self.step_records_keep
        )

    @property
    def db_path(self) -> Path:
        """The SQLite file holding jobs, events, metrics, checkpoints and drills."""
        return self.state_dir / "elastic-sgd.sqlite3"

    @property
    def runs_dir(self) -> Path:
        """Where each job's outputs go (``runs/<job id>/``)."""
        return self.state_dir / "runs"

    @property
    def budgets(self) -> Budgets:
        """The budget settings as :class:`service.budget.Budgets`."""
        from service.budget import Budgets  # torch comes with it: only when admitting jobs

        return Budgets(
            job_memory_bytes=self.job_memory_bytes,
            service_memory_bytes=self.service_memory_bytes,
            job_workers=self.job_workers,
            service_processes=self.service_processes,
        )

    @property
    def token_value(self) -> str | None:
        return None if self.token is None else self.token.get_secret_value()


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings` from the environment plus explicit ``overrides``.

    ``None`` overrides are ignored, so CLI flags that were not given fall through to the
    environment.

    Raises:
        SettingsError: one ``(setting, message)`` per refused value.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = [("settings" if p == "spec" else p, m) for p, m in format_errors(exc)]
        raise SettingsError(problems) from None
