"""Turning a Kafka record into a valid Request, or an InvalidRequest that names field and value.

The fast path is one typed msgspec decode; only a failure pays for a second, untyped
decode to find the offending value and salvage `id`/`reply_to` for an error reply.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Final

import msgspec

from topics.errors import InvalidRequest
from topics.specs import REQUEST_DECODER
from topics.wire import Request

__all__ = ["MAX_SHOWN_VALUE", "Salvaged", "parse_request", "salvage"]

_RAW: Final = msgspec.json.Decoder()
_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_SHOWN_VALUE: Final = 80
_PATH: Final = re.compile(r"`\$(?P<path>[^`]*)`")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 3] + "..."


def _lookup(raw: Any, path: str) -> Any:
    cur = raw
    for key, idx in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        try:
            cur = cur[int(idx)] if idx else cur[key]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def parse_request(value: bytes | None) -> Request:
    """Decode and validate one `llm.requests` value; raises InvalidRequest."""
    if value is None:
        raise InvalidRequest("the record has no value (expected a Request JSON object)")
    try:
        req = REQUEST_DECODER.decode(value)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = _PATH.search(msg)
        if m is None:
            raise InvalidRequest(msg) from None
        path = m.group("path").lstrip(".")
        raw: Any = None
        with contextlib.suppress(msgspec.DecodeError):
            raw = _RAW.decode(value)
        base = msg.split(" - at ")[0]
        shown = _lookup(raw, m.group("path"))
        suffix = f", got {_show(shown)}" if shown is not None and "missing" not in base else ""
        raise InvalidRequest(f"{path or 'value'}: {base}{suffix}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"value is not valid UTF-8 JSON: {exc}") from None
    _check_body(req.request)
    return req


def _check_body(body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(f"request.model: expected a non-empty string, got {_show(model)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"request.messages: expected a non-empty array, got {_show(messages)}")
    for i, msg in enumerate(messages):
        where = f"request.messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"{where}: expected an object, got {_show(msg)}")
        role = msg.get("role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"{where}.role: expected one of {sorted(_ROLES)}, got {_show(role)}"
            )
        content = msg.get("content")
        if not (isinstance(content, str | list) or (content is None and role == "assistant")):
            raise InvalidRequest(
                f"{where}.content: expected a string or an array, got {_show(content)}"
            )
    for field in ("max_tokens", "max_completion_tokens"):
        v = body.get(field)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidRequest(f"request.{field}: expected a positive integer, got {_show(v)}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"request.stream: expected a boolean, got {_show(stream)}")
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest(f"request.n: only 1 choice per request is supported, got {_show(n)}")


class Salvaged(msgspec.Struct, frozen=True):
    """What can still be read from an invalid value to answer it."""

    id: str
    reply_to: str | None
    tenant: str


def salvage(value: bytes | None) -> Salvaged | None:
    """`id` (and `reply_to`, `tenant`) of a broken value, if they are readable and sane."""
    if not value:
        return None
    try:
        raw = _RAW.decode(value)
    except msgspec.DecodeError:
        return None
    if not isinstance(raw, dict):
        return None
    rid, reply_to, tenant = raw.get("id"), raw.get("reply_to"), raw.get("tenant", "default")
    if not isinstance(rid, str) or not 1 <= len(rid) <= 128:
        return None
    if reply_to is not None and (
        not isinstance(reply_to, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", reply_to)
    ):
        return None
    if not isinstance(tenant, str) or not 1 <= len(tenant) <= 128:
        tenant = "default"
    return Salvaged(rid, reply_to, tenant)
