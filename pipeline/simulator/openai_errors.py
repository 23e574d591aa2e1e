"""OpenAI's error bodies, word for word, so clients' error handling sees the real shapes."""

from __future__ import annotations

from typing import Any

import msgspec

from pipeline.simulator.durations import format_go_duration
from pipeline.simulator.limiter import Rejection

__all__ = [
    "ORGANIZATION",
    "error_body",
    "insufficient_quota_body",
    "invalid_key_body",
    "mask_key",
    "missing_key_body",
    "overloaded_body",
    "rate_limit_body",
    "server_error_body",
]

ORGANIZATION = "org-sim"

_ENCODER = msgspec.json.Encoder()


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """`{"error": {message, type, param, code}}` as JSON bytes."""
    body: dict[str, Any] = {
        "error": {"message": message, "type": type_, "param": param, "code": code}
    }
    return _ENCODER.encode(body)


def mask_key(key: str) -> str:
    """Show only the last 4 characters of a presented key (nothing of a short one)."""
    prefix = "sk-" if key.startswith("sk-") else ""
    if len(key) < 12:
        return f"{prefix}..."
    return f"{prefix}...{key[-4:]}"


def invalid_key_body(presented: str) -> bytes:
    """401 for a key the simulator does not know."""
    return error_body(
        f"Incorrect API key provided: {mask_key(presented)}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        "invalid_api_key",
    )


def missing_key_body() -> bytes:
    """401 for a request without `Authorization: Bearer ...`."""
    return error_body(
        "You didn't provide an API key. You need to provide your API key in an "
        "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        "invalid_request_error",
        "invalid_api_key",
    )


def rate_limit_body(model: str, rejection: Rejection) -> bytes:
    """429 `rate_limit_exceeded`: either a window is full or the request can never fit."""
    what = "requests per min (RPM)" if rejection.kind == "requests" else "tokens per min (TPM)"
    if rejection.too_large or rejection.retry_after_ms is None:
        message = (
            f"Request too large for {model} in organization {ORGANIZATION} on {what}: "
            f"Limit {rejection.limit}, Requested {rejection.requested}. The input or output "
            "tokens must be reduced in order to run successfully."
        )
    else:
        message = (
            f"Rate limit reached for {model} in organization {ORGANIZATION} on {what}: "
            f"Limit {rejection.limit}, Used {rejection.used}, Requested {rejection.requested}. "
            f"Please try again in {format_go_duration(rejection.retry_after_ms)}."
        )
    return error_body(message, rejection.kind, "rate_limit_exceeded")


def insufficient_quota_body() -> bytes:
    """429 for an exhausted key: waiting does not help."""
    return error_body(
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        "insufficient_quota",
    )


def server_error_body() -> bytes:
    """500 as OpenAI sends it."""
    return error_body(
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    )


def overloaded_body() -> bytes:
    """503 as OpenAI sends it when the engine is overloaded."""
    return error_body(
        "The engine is currently overloaded, please try again later.",
        "server_error",
        "overloaded",
    )
