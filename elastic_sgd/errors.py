"""What :class:`elastic_sgd.Client` raises: one hierarchy under ``ElasticSGDError``.

Every error of the client is a :class:`ServiceError`. The service could not be reached at
all (refused connection, timeout, a broken stream): :class:`ServiceUnreachable`, naming
the URL. The service answered with an error status: an :class:`ApiError` carrying the
status, the service's ``detail`` (what went wrong and what to change) and the refused
fields (``errors``: the service's :class:`~api.schemas.FieldError` list, ``path`` and
``message`` each). Which subclass it is follows from the status alone:

=====  =========================  =============================================
code   class                      when
=====  =========================  =============================================
400    :class:`RequestRefused`    a refusal the user can act on
401    :class:`Unauthorized`      no bearer token sent; the route needs one
403    :class:`Forbidden`         the token is not the server's
404    :class:`NotFound`          unknown job, drill or route
409    :class:`Conflict`          the job's state forbids the action
413    :class:`PayloadTooLarge`   the body is over the service's limit
422    :class:`ValidationFailed`  a field was refused (``errors`` has the paths)
429    :class:`TooManyRequests`   too many streams or requests at once
5xx    :class:`ServerFailed`      the service failed (a bug, or not ready)
=====  =========================  =============================================

A 4xx not listed is a :class:`RequestRefused`; any other status an :class:`ApiError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import ValidationError

from api.schemas import ErrorPublic, FieldError
from core.errors import ElasticSGDError


class ServiceError(ElasticSGDError):
    """Base class of everything the client raises."""


class ServiceUnreachable(ServiceError):
    """No answer from the service: it is not running there, or the network failed.

    Args:
        url: the service's address the client used.
        reason: what the transport said (the exception's type and message).
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"cannot reach the service at {url} ({reason}): start it with `elastic-sgd serve`,"
            " or point the client (--url / ESGD_URL) at it"
        )

    def __reduce__(self) -> tuple[type[ServiceUnreachable], tuple[str, str]]:
        return (type(self), (self.url, self.reason))


class UnexpectedAnswer(ServiceError):
    """The service answered, but not with what the route promises (another version of the
    service, or something else listening at the URL)."""


class ApiError(ServiceError):
    """The service answered with an error status.

    Args:
        status: the HTTP status code.
        detail: the service's explanation (what went wrong and what to change).
        errors: the refused fields, as the service listed them.
        errors_omitted: how many more fields were refused than ``errors`` lists.
        method: the request's method.
        path: the request's path.
    """

    def __init__(
        self,
        status: int,
        detail: str,
        errors: Sequence[FieldError] = (),
        errors_omitted: int = 0,
        method: str = "",
        path: str = "",
    ) -> None:
        self.status = status
        self.detail = detail
        self.errors = list(errors)
        self.errors_omitted = errors_omitted
        self.method = method
        self.path = path
        where = f" ({method} {path})" if method else ""
        lines = [f"{status}: {detail}{where}"]
        lines += [f"  {e.path}: {e.message}" for e in self.errors]
        if errors_omitted:
            lines.append(f"  ... and {errors_omitted} more fields")
        super().__init__("\n".join(lines))

    def __reduce__(
        self,
    ) -> tuple[type[ApiError], tuple[int, str, list[FieldError], int, str, str]]:
        args = (self.status, self.detail, self.errors, self.errors_omitted, self.method, self.path)
        return (type(self), args)

    @property
    def problems(self) -> list[tuple[str, str]]:
        """The refused fields as ``(path, message)`` pairs, as :class:`SpecError` has them."""
        return [(e.path, e.message) for e in self.errors]


class RequestRefused(ApiError):
    """A 4xx: the request was refused; ``detail`` and ``errors`` say what to change."""


class Unauthorized(RequestRefused):
    """401: the route needs the server's bearer token (``Client(token=...)``)."""


class Forbidden(RequestRefused):
    """403: the bearer token sent is not the server's."""


class NotFound(RequestRefused):
    """404: no such job, drill or route."""


class Conflict(RequestRefused):
    """409: the job's (or drill's) state forbids the action, e.g. scaling a finished job."""


class PayloadTooLarge(RequestRefused):
    """413: the request body is over the service's ``max_body_bytes``."""


class ValidationFailed(RequestRefused):
    """422: fields were refused; ``errors`` names each one (``path``) and why (``message``)."""


class TooManyRequests(RequestRefused):
    """429: the service is at a limit (e.g. ``max_stream_subscribers``): retry later."""


class ServerFailed(ApiError):
    """5xx: the service failed (a 500 is a bug in it, logged there; a 503 is not ready)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: TooManyRequests,
}


def error_class(status: int) -> type[ApiError]:
    """The :class:`ApiError` subclass of an error status (see the module's table)."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if 400 <= status < 500:
        return RequestRefused
    if status >= 500:
        return ServerFailed
    return ApiError


def error_of(status: int, body: bytes, method: str = "", path: str = "") -> ApiError:
    """The error an answer with ``status`` and ``body`` stands for.

    A body that is the service's :class:`~api.schemas.ErrorPublic` gives ``detail`` and
    ``errors``; any other body (a proxy's page, plain text) becomes the ``detail`` as it is.

    Args:
        status: the HTTP status (400 or more).
        body: the answer's body.
        method: the request's method (for the message).
        path: the request's path (for the message).
    """
    cls = error_class(status)
    try:
        parsed = ErrorPublic.model_validate_json(body)
    except ValidationError:
        text = body.decode("utf-8", errors="replace").strip()
        try:  # JSON, but not ours (e.g. {"detail": ...} from another server)
            data = json.loads(text)
            detail = str(data.get("detail", text)) if isinstance(data, dict) else text
        except ValueError:
            detail = text
        return cls(status, detail[:2000] or f"HTTP {status}", method=method, path=path)
    return cls(
        status,
        parsed.detail,
        parsed.errors,
        parsed.errors_omitted,
        method=method,
        path=path,
    )
