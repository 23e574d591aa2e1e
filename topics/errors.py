"""The one exception tree of quotaflow, and the error codes of the wire contract.

Every error a request can end with maps to one `RequestError` subclass whose `code`
is the `error.code` sent on the reply topic (CONTRACT.md, "Replies").
"""

from __future__ import annotations

from typing import ClassVar, Literal

__all__ = [
    "ERROR_CODES",
    "ConfigError",
    "DeadlineExceeded",
    "ErrorCode",
    "InternalError",
    "InvalidRequest",
    "KafkaLocalError",
    "QuotaExceeded",
    "QuotaflowError",
    "RequestError",
    "RequestTooLarge",
    "SimulatorError",
    "Unauthorized",
    "UnknownModel",
    "UpstreamError",
    "UpstreamUnavailable",
    "error_for_code",
]

ErrorCode = Literal[
    "invalid_request",
    "unauthorized",
    "unknown_model",
    "deadline_exceeded",
    "quota_exceeded",
    "request_too_large",
    "upstream_error",
    "upstream_unavailable",
    "internal",
]

ERROR_CODES: tuple[ErrorCode, ...] = (
    "invalid_request",
    "unauthorized",
    "unknown_model",
    "deadline_exceeded",
    "quota_exceeded",
    "request_too_large",
    "upstream_error",
    "upstream_unavailable",
    "internal",
)


class QuotaflowError(Exception):
    """Root of every error quotaflow raises on purpose."""


class ConfigError(QuotaflowError):
    """The config file is unreadable, or a key or value in it is wrong (message names it)."""


class KafkaLocalError(QuotaflowError):
    """The local broker could not be fetched, started or stopped (message names the log)."""


class SimulatorError(QuotaflowError):
    """The provider simulator could not start or was misconfigured."""


class RequestError(QuotaflowError):
    """A request ends with this error; `code` is the wire `error.code`."""

    code: ClassVar[ErrorCode] = "internal"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class InvalidRequest(RequestError):
    code = "invalid_request"


class Unauthorized(RequestError):
    code = "unauthorized"


class UnknownModel(RequestError):
    code = "unknown_model"


class DeadlineExceeded(RequestError):
    code = "deadline_exceeded"


class QuotaExceeded(RequestError):
    code = "quota_exceeded"


class RequestTooLarge(RequestError):
    code = "request_too_large"


class UpstreamError(RequestError):
    code = "upstream_error"


class UpstreamUnavailable(RequestError):
    code = "upstream_unavailable"
    retryable = True


class InternalError(RequestError):
    code = "internal"
    retryable = True


_BY_CODE: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        Unauthorized,
        UnknownModel,
        DeadlineExceeded,
        QuotaExceeded,
        RequestTooLarge,
        UpstreamError,
        UpstreamUnavailable,
        InternalError,
    )
}


def error_for_code(code: str) -> type[RequestError]:
    """The exception class for a wire error code (unknown codes map to `InternalError`)."""
    return _BY_CODE.get(code, InternalError)
