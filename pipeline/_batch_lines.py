"""Batch input: each JSONL line becomes a Request, or an error naming the line and field.

Accepted forms, one JSON object per line (blank lines are skipped):

* **Request-like**: `{"id"?, "request": {OpenAI body}, "tenant"?, "priority"?,
  "deadline_ms"?, "tier"?, "task"?, "cache"?, "metadata"?, ...}`, a CONTRACT.md
  Request without `reply_to` (the batch reads its own replies);
* **short**: `{"id"?, "prompt": "...", "system"?, "model"?, "max_tokens"?,
  "temperature"?}` plus any of the Request-like form's envelope fields;
* **bare OpenAI body**: `{"id"?, "messages": [...], "model"?, ...}`: everything but
  `id` is the Chat Completions body;
* **OpenAI Batch API line**: `{"custom_id", "method"?: "POST",
  "url"?: "/v1/chat/completions", "body": {...}}`, `custom_id` being the id.

The command line fills what a line leaves out: `model`, `max_tokens` (when the body has
neither `max_tokens` nor `max_completion_tokens`) and `tenant`.

A line without an id gets `<prefix><32 hex>`: the start of the sha256 of the canonical
request (tenant, envelope and body, never the line number), with `.k` added for the k-th
repeat of the same request in the file. The same file with the same options yields the
same ids, so a resumed batch resends only what has no result yet, and adding or moving
lines changes no other line's id. Identical requests in another file get the same id too,
so within the gateway's idempotency window they would be answered with the earlier
result: give such batches an `--id-prefix` (e.g. the date) or explicit ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import msgspec

from pipeline._validate import MAX_SHOWN_VALUE, parse_request
from topics.errors import InvalidRequest, QuotaflowError
from topics.wire import Request

__all__ = [
    "ENVELOPE_FIELDS",
    "ID_DIGEST_CHARS",
    "MAX_ID_PREFIX",
    "BatchInputError",
    "BatchItem",
    "LineDefaults",
    "LineError",
    "derive_key",
    "iter_items",
    "parse_line",
    "read_items",
]

# A CONTRACT.md Request's fields a line may set besides its body (`reply_to` is ours).
ENVELOPE_FIELDS: Final = frozenset(Request.__struct_fields__) - {"id", "request", "reply_to"}
# Body fields the short form takes besides `prompt` and `system`.
_SHORT_BODY: Final = ("model", "max_tokens", "temperature")
_SHORT_FIELDS: Final = frozenset({"id", "prompt", "system", *_SHORT_BODY}) | ENVELOPE_FIELDS
_FULL_FIELDS: Final = frozenset({"id", "request"}) | ENVELOPE_FIELDS
_OPENAI_BATCH_FIELDS: Final = frozenset({"custom_id", "method", "url", "body"})
_OPENAI_BATCH_URLS: Final = frozenset({"/v1/chat/completions", "/chat/completions"})
# 128 bits of sha256 in hex: no collision among any file's lines in practice.
ID_DIGEST_CHARS: Final = 32
# Request ids are 1..128 characters; room for the digest and a `.k` repeat suffix.
MAX_ID_PREFIX: Final = 64
_MAX_ID: Final = 128
_CANON: Final = msgspec.json.Encoder(order="sorted")
_RAW: Final = msgspec.json.Decoder()
_PLACEHOLDER_ID: Final = "-"


class BatchInputError(QuotaflowError):
    """The batch input (or an option shaping it) cannot be used at all."""


class LineDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """What the command line fills in for a line that does not say."""

    model: str
    tenant: str = "default"
    max_tokens: int | None = None
    id_prefix: str = ""


class BatchItem(msgspec.Struct, frozen=True, kw_only=True):
    """One input line: its request, or the error that keeps it from being sent."""

    line: int
    id: str
    request: Request | None = None
    error: str | None = None
    # The id was already used by an earlier line (this line's error says which).
    duplicate: bool = False


class LineError(QuotaflowError):
    """One line that cannot be sent; `message` names the field and value (not fatal)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 3] + "..."


def _check_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_ID:
        raise LineError(
            f"{field}: expected a string of 1..{_MAX_ID} characters, got {_show(value)}"
        )
    return value


def _unknown(obj: dict[str, Any], allowed: frozenset[str], form: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise LineError(
            f"{extra[0]}: unknown field for a {form} line (it takes {', '.join(sorted(allowed))})"
        )


def _short_body(obj: dict[str, Any]) -> dict[str, Any]:
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise LineError(f"prompt: expected a non-empty string, got {_show(prompt)}")
    messages: list[dict[str, Any]] = []
    if "system" in obj:
        system = obj["system"]
        if not isinstance(system, str):
            raise LineError(f"system: expected a string, got {_show(system)}")
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {"messages": messages}
    body.update({k: obj[k] for k in _SHORT_BODY if k in obj})
    return body


def _split(obj: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any], str]:
    """(explicit id or None, envelope, body, prefix naming body fields in errors)."""
    if "request" in obj:
        if "reply_to" in obj:
            raise LineError("reply_to: not allowed in a batch line (the batch reads the replies)")
        _unknown(obj, _FULL_FIELDS, "Request-like")
        body = obj["request"]
        if not isinstance(body, dict):
            raise LineError(f"request: expected an object, got {_show(body)}")
        envelope = {k: obj[k] for k in ENVELOPE_FIELDS if k in obj}
        return obj.get("id"), envelope, dict(body), "request."
    if "custom_id" in obj or "body" in obj:
        _unknown(obj, _OPENAI_BATCH_FIELDS, "OpenAI Batch API")
        if "custom_id" not in obj:
            raise LineError("custom_id: missing (an OpenAI Batch API line needs it)")
        method = obj.get("method", "POST")
        if method != "POST":
            raise LineError(f"method: expected 'POST', got {_show(method)}")
        url = obj.get("url", "/v1/chat/completions")
        if url not in _OPENAI_BATCH_URLS:
            raise LineError(f"url: expected '/v1/chat/completions', got {_show(url)}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineError(f"body: expected an object, got {_show(body)}")
        return _check_id(obj["custom_id"], "custom_id"), {}, dict(body), "body."
    if "prompt" in obj:
        _unknown(obj, _SHORT_FIELDS, "short")
        envelope = {k: obj[k] for k in ENVELOPE_FIELDS if k in obj}
        return obj.get("id"), envelope, _short_body(obj), ""
    if "messages" in obj:
        return obj.get("id"), {}, {k: v for k, v in obj.items() if k != "id"}, ""
    raise LineError(
        "expected a 'prompt', 'messages' or 'request' field, or 'custom_id' and 'body' "
        f"(OpenAI Batch API), got fields {sorted(obj)}"
    )


def parse_line(raw: bytes, defaults: LineDefaults) -> tuple[str | None, Request]:
    """(the line's own id or None, its Request with a placeholder id); raises LineError.

    The Request is checked as the gateway checks it (`parse_request`), so a line the
    gateway would refuse is reported here, naming the field as the line spells it.
    """
    try:
        obj = _RAW.decode(raw)
    except msgspec.DecodeError as exc:
        raise LineError(f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {_show(obj)}")
    own_id, envelope, body, where = _split(obj)
    if own_id is not None:
        own_id = _check_id(own_id, "id")
    body.setdefault("model", defaults.model)
    if defaults.max_tokens is not None and not {"max_tokens", "max_completion_tokens"} & set(body):
        body["max_tokens"] = defaults.max_tokens
    envelope.setdefault("tenant", defaults.tenant)
    candidate = {"id": _PLACEHOLDER_ID, "request": body, **envelope}
    try:
        request = parse_request(_CANON.encode(candidate))
    except InvalidRequest as exc:
        message = str(exc)
        if message.startswith("request."):
            message = where + message.removeprefix("request.")
        raise LineError(message) from None
    return own_id, request


def derive_key(request: Request) -> str:
    """Hex digest of the canonical request (tenant, envelope, body), id and reply_to left out."""
    fields = msgspec.to_builtins(request)
    fields.pop("id", None)
    fields.pop("reply_to", None)
    return hashlib.sha256(_CANON.encode(fields)).hexdigest()[:ID_DIGEST_CHARS]


def _raw_key(raw: bytes) -> str:
    return hashlib.sha256(b"line\0" + raw).hexdigest()[:ID_DIGEST_CHARS]


def iter_items(lines: Iterable[bytes], defaults: LineDefaults) -> Iterator[BatchItem]:
    """One item per non-blank line (numbered from 1), with its id settled.

    Deterministic in the lines and `defaults`: calling it twice on the same input gives
    the same ids, which is what lets a resumed batch skip what already has a result.
    """
    if len(defaults.id_prefix) > MAX_ID_PREFIX:
        raise BatchInputError(
            f"--id-prefix: at most {MAX_ID_PREFIX} characters, got {len(defaults.id_prefix)}"
        )
    repeats: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw_line in enumerate(lines, start=1):
        raw = raw_line.strip()
        if not raw:
            continue
        own_id: str | None = None
        request: Request | None = None
        error: str | None = None
        try:
            own_id, request = parse_line(raw, defaults)
        except LineError as exc:
            error = f"line {number}: {exc.message}"
            own_id = _salvage_id(raw)
        if own_id is None:
            key = derive_key(request) if request is not None else _raw_key(raw)
            k = repeats.get(key, 0)
            repeats[key] = k + 1
            own_id = defaults.id_prefix + key + (f".{k}" if k else "")
        if own_id in first_line:
            yield BatchItem(
                line=number,
                id=own_id,
                error=f"line {number}: id: {own_id!r} already used on line {first_line[own_id]}",
                duplicate=True,
            )
            continue
        first_line[own_id] = number
        if request is not None:
            request = msgspec.structs.replace(request, id=own_id)
        yield BatchItem(line=number, id=own_id, request=request, error=error)


def _salvage_id(raw: bytes) -> str | None:
    """A broken line's own id, when it has a usable one (so its error line carries it)."""
    try:
        obj = _RAW.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    value = obj.get("custom_id") if "custom_id" in obj else obj.get("id")
    if isinstance(value, str) and 1 <= len(value) <= _MAX_ID:
        return value
    return None


def read_items(path: Path, defaults: LineDefaults) -> Generator[BatchItem, None, None]:
    """`iter_items` over the file at `path`, read lazily (a batch may not fit in memory)."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise BatchInputError(f"--file: cannot read {str(path)!r}: {exc.strerror}") from None
    with handle:
        yield from iter_items(handle, defaults)
