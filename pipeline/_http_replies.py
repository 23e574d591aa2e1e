"""Quotaflow replies as the OpenAI HTTP API shapes them: error statuses, SSE, completions.

Pure functions and one small state machine, so `pipeline.frontdoor` stays wiring and all
of this is tested without a server. A passing rate limit waits in quotaflow instead of
failing, so no error here is ever a 429 (which the `openai` SDK would retry at once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

from topics.errors import ERROR_CODES, QuotaflowError
from topics.wire import DoneReply

__all__ = [
    "HTTP_ONLY_CODES",
    "HttpError",
    "StreamDiverged",
    "StreamSplicer",
    "completion_as_chunk",
    "completion_from_chunks",
    "error_body",
    "error_headers",
    "http_error",
    "sse_data",
]

_ENCODER: Final = msgspec.json.Encoder()


class HttpError(msgspec.Struct, frozen=True):
    """How one error code is answered over HTTP: its status and OpenAI's `error.type`."""

    status: int
    type: str


# Wire error codes (CONTRACT.md) -> HTTP. quota_exceeded is 402 Payment Required: a
# tenant's daily or monthly budget is spent, which only money or a new period fixes; it
# is neither a permission problem (403) nor one that waiting a moment fixes (429), and
# the SDK does not retry it.
_BY_CODE: Final[dict[str, HttpError]] = {
    "invalid_request": HttpError(400, "invalid_request_error"),
    "unauthorized": HttpError(401, "authentication_error"),
    "unknown_model": HttpError(404, "invalid_request_error"),
    "deadline_exceeded": HttpError(504, "timeout_error"),
    "quota_exceeded": HttpError(402, "insufficient_quota"),
    "request_too_large": HttpError(413, "invalid_request_error"),
    "upstream_error": HttpError(502, "server_error"),
    "upstream_unavailable": HttpError(503, "server_error"),
    "internal": HttpError(500, "server_error"),
}
# Codes only the front door produces (never on a reply topic).
HTTP_ONLY_CODES: Final[dict[str, HttpError]] = {
    # No terminal reply within the front door's request timeout.
    "timeout": HttpError(504, "timeout_error"),
    # Another HTTP request with the same X-Request-Id is still running on this server.
    "request_in_flight": HttpError(409, "invalid_request_error"),
    # A retry restarted a stream whose first tokens were already sent, and differs (SSE).
    "stream_reset": HttpError(502, "server_error"),
    "not_found": HttpError(404, "invalid_request_error"),
    "method_not_allowed": HttpError(405, "invalid_request_error"),
}
assert set(_BY_CODE) == set(ERROR_CODES), "every wire error code needs an HTTP status"
assert all(e.status != 429 for e in (*_BY_CODE.values(), *HTTP_ONLY_CODES.values()))


def http_error(code: str) -> HttpError:
    """The HTTP answer for a wire or front-door error code (unknown codes: 500)."""
    return _BY_CODE.get(code) or HTTP_ONLY_CODES.get(code) or _BY_CODE["internal"]


def error_body(code: str, message: str) -> bytes:
    """`{"error": {message, type, param, code}}`, the shape the `openai` SDK parses."""
    err = http_error(code)
    return _ENCODER.encode(
        {"error": {"message": message, "type": err.type, "param": None, "code": code}}
    )


def error_headers(*, retryable: bool, retry_after_ms: int | None) -> dict[str, str]:
    """Retry hints the `openai` SDK obeys: `x-should-retry`, `retry-after-ms`, `retry-after`."""
    headers = {"x-should-retry": "true" if retryable else "false"}
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
        headers["retry-after"] = str(max(1, math.ceil(retry_after_ms / 1000)))
    return headers


def sse_data(payload: Mapping[str, Any] | bytes) -> bytes:
    """One server-sent event carrying `payload` as JSON (bytes are sent as they are)."""
    data = payload if isinstance(payload, bytes) else _ENCODER.encode(payload)
    return b"data: " + data + b"\n\n"


class StreamDiverged(QuotaflowError):
    """A restarted stream no longer repeats what the client already received."""


_TEXT_DELTA_KEYS: Final = frozenset({"role", "content"})


class StreamSplicer:
    """Decides which chunks an SSE client sees when a `reset` restarts the answer.

    Chunks already sent cannot be taken back. After a reset the new attempt's text is
    held and compared with the text already sent: while it repeats it nothing is
    forwarded, once it goes past it only the new part is; if it differs (or ends
    early), `StreamDiverged` is raised and the stream must end with an error. A reset
    before any text was sent is invisible. Deterministic retries (temperature 0, the
    same model, a cache replay) therefore continue seamlessly.
    """

    def __init__(self) -> None:
        self._sent: list[str] = []
        self._sent_len = 0
        # Set after a reset: how much of the sent text the new attempt has repeated.
        self._replayed: int | None = None
        self._role_sent = False
        # A forwarded chunk carried more than text (tool calls, ...): no splice possible.
        self._opaque = False
        self._reason = ""

    @property
    def sent_text(self) -> str:
        return "".join(self._sent)

    def reset(self, reason: str) -> None:
        """A `reset` reply arrived: the next chunks start the answer over."""
        self._reason = reason
        if self._opaque:
            raise StreamDiverged(
                f"the answer restarted ({reason}) after non-text output was streamed"
            )
        self._replayed = 0 if self._sent_len else None

    def feed(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk to forward for `chunk` (maybe trimmed), or None to forward nothing."""
        choices = chunk.get("choices") or []
        delta: dict[str, Any] = (choices[0].get("delta") or {}) if choices else {}
        finish = choices[0].get("finish_reason") if choices else None
        content = delta.get("content") or ""
        # Only text (role, content; other keys null) can be compared across attempts.
        plain = all(k in _TEXT_DELTA_KEYS or v is None for k, v in delta.items())
        if self._replayed is not None:
            return self._feed_replay(chunk, content, plain=plain, finish=finish, empty=not choices)
        if not plain:
            self._opaque = True
        opening = plain and choices and not content and finish is None and not chunk.get("usage")
        if opening and self._role_sent:
            return None  # a restarted attempt's opening role chunk: the client has one
        self._role_sent = self._role_sent or "role" in delta
        self._remember(content)
        return chunk

    def _feed_replay(
        self, chunk: dict[str, Any], content: str, *, plain: bool, finish: Any, empty: bool
    ) -> dict[str, Any] | None:
        assert self._replayed is not None
        sent = self.sent_text
        pending = self._sent_len - self._replayed
        if not plain or empty:
            raise self._diverged()
        overlap = content[:pending]
        if overlap != sent[self._replayed : self._replayed + len(overlap)]:
            raise self._diverged()
        self._replayed += len(overlap)
        rest = content[len(overlap) :]
        if self._replayed < self._sent_len:
            if finish is not None:
                raise self._diverged()
            return None
        self._replayed = None  # caught up: from here on the new attempt streams as usual
        if not rest and finish is None:
            return None
        self._remember(rest)
        choice = dict(chunk["choices"][0])
        delta = {k: v for k, v in (choice.get("delta") or {}).items() if k != "role"}
        delta["content"] = rest
        choice["delta"] = delta
        return {**chunk, "choices": [choice, *chunk["choices"][1:]]}

    def _remember(self, content: str) -> None:
        if content:
            self._sent.append(content)
            self._sent_len += len(content)

    def _diverged(self) -> StreamDiverged:
        return StreamDiverged(
            f"the answer restarted ({self._reason}) after {self._sent_len} characters were "
            "streamed, and the new attempt differs from them; send the request again"
        )


def completion_as_chunk(completion: Mapping[str, Any]) -> dict[str, Any]:
    """A `chat.completion` as one `chat.completion.chunk` (for a streaming client)."""
    choices = []
    for choice in completion.get("choices") or []:
        message = choice.get("message") or {}
        delta = {k: v for k, v in message.items() if v is not None and k != "refusal"}
        choices.append(
            {
                "index": choice.get("index", 0),
                "delta": delta,
                "logprobs": None,
                "finish_reason": choice.get("finish_reason"),
            }
        )
    return {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
        "choices": choices,
    }


def completion_from_chunks(chunks: Sequence[Mapping[str, Any]], done: DoneReply) -> dict[str, Any]:
    """A `chat.completion` assembled from streamed chunks (for a non-streaming client)."""
    text = "".join(
        str((choice.get("delta") or {}).get("content") or "")
        for chunk in chunks
        for choice in chunk.get("choices") or []
    )
    first: Mapping[str, Any] = chunks[0] if chunks else {}
    usage = done.usage
    return {
        "id": first.get("id", f"chatcmpl-{done.id}"),
        "object": "chat.completion",
        "created": first.get("created", 0),
        "model": first.get("model", done.model),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": done.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
    }
