"""Turning a Kafka record into a valid Request, or an InvalidRequest that names field and value.

The fast path is one typed msgspec decode plus checks of the envelope and the OpenAI body;
only a failure pays for a second look (an untyped decode, or an iterative token scan where
the value nests too deep for the decoder) to name the offending value and salvage
`id`/`reply_to`. Every value echoed in a reason is clipped, and everything a reply echoes
is bounded, so no reason or reply grows with the input.
"""

from __future__ import annotations

import re
import reprlib
import sys
from collections.abc import Iterator
from typing import Any, Final

import msgspec

from topics.config import Model
from topics.errors import InvalidRequest
from topics.specs import REQUEST_DECODER
from topics.wire import Request

__all__ = [
    "MAX_METADATA_BYTES",
    "MAX_NESTING",
    "MAX_SHOWN_VALUE",
    "Salvaged",
    "parse_request",
    "reply_topic_ok",
    "salvage",
]

# The most characters of a value (or a field path) a reason shows.
MAX_SHOWN_VALUE: Final = 80
# Deepest nesting of arrays/objects accepted (the Request object itself is level 1): far
# below the decoder's recursion limit, so an accepted value also encodes, pickles and
# reaches the upstream wherever it goes next, whatever the stack depth there.
MAX_NESTING: Final = 64
# `metadata` is echoed on the terminal reply; bounded so that reply always fits a record.
MAX_METADATA_BYTES: Final = 65_536
# JSON integers beyond 64 bits are not portable; the wire's counts and times fit in them.
_INT64_MAX: Final = 2**63 - 1

_RAW: Final = msgspec.json.Decoder()
_STR: Final = msgspec.json.Decoder(str)
_ENCODER: Final = msgspec.json.Encoder()
_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# msgspec raises DecodeError for malformed JSON, but UnicodeDecodeError for invalid UTF-8
# inside a string it decodes to `str`.
_UNREADABLE: Final = (msgspec.DecodeError, UnicodeDecodeError)
_PATH: Final = re.compile(r"`\$(?P<path>[^`]*)`")
# A topic name Kafka accepts; '.', '..' and '__'-prefixed (internal) names are refused apart.
_TOPIC: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
# One JSON token a scan cares about: a string, a number, or punctuation.
_TOKEN: Final = re.compile(
    rb'"[^"\\]*(?:\\.[^"\\]*)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[\[\]{},:]', re.DOTALL
)
# What may stand between two tokens: whitespace and at most one literal.
_GAP: Final = re.compile(rb"\s*(?:true|false|null)?\s*")
_PLAIN_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

_REPR: Final = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = MAX_SHOWN_VALUE


def _struct_fields(cls: type[msgspec.Struct]) -> tuple[msgspec.inspect.Field, ...]:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType), info
    return info.fields


def _model_name_rule() -> tuple[int, re.Pattern[str]]:
    """The config's rule for model names: a `request.model` outside it can name no model."""
    kind = next(f.type for f in _struct_fields(Model) if f.name == "name")
    assert isinstance(kind, msgspec.inspect.StrType), kind
    assert kind.max_length is not None, kind
    assert kind.pattern is not None, kind
    return kind.max_length, re.compile(kind.pattern)


def _enum_choices() -> dict[str, tuple[Any, ...]]:
    """Request fields that take one of a few literal values, with those values."""
    out: dict[str, tuple[Any, ...]] = {}
    for f in _struct_fields(Request):
        kinds = f.type.types if isinstance(f.type, msgspec.inspect.UnionType) else (f.type,)
        for kind in kinds:
            if isinstance(kind, msgspec.inspect.LiteralType):
                out[f.name] = kind.values
    return out


_MODEL_NAME_RULE: Final = _model_name_rule()
_MODEL_NAME_MAX: Final = _MODEL_NAME_RULE[0]
_MODEL_NAME: Final = _MODEL_NAME_RULE[1]
_CHOICES: Final = _enum_choices()


def _clip(text: str) -> str:
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 3] + "..."


def _show(value: Any) -> str:
    """A bounded repr: reprlib cuts long strings and deep or wide containers without recursing."""
    return _clip(_REPR.repr(value))


def reply_topic_ok(name: object) -> bool:
    """Is `name` a topic the gateway may write replies to (a legal, non-internal Kafka name)?"""
    return (
        isinstance(name, str)
        and _TOPIC.fullmatch(name) is not None
        and name not in (".", "..")
        and not name.startswith("__")
    )


# -- the iterative token scan (error paths only) ------------------------------------------


def _key(token: bytes) -> str:
    try:
        return _STR.decode(token)
    except _UNREADABLE:
        return token[1:-1].decode(errors="replace")


def _spans(
    value: bytes, *, strict: bool = False
) -> Iterator[tuple[re.Match[bytes], list[str | int]]]:
    """Each string value, number and opening bracket of a JSON text (as a match), with its path.

    Iterative, so it goes where the recursive decoder cannot; object keys are not yielded
    but name the path. The path list is live: copy it to keep it. `strict` raises
    ValueError where the text between tokens, or the bracket balance, is not JSON's.
    """
    path: list[str | int] = []
    in_array: list[bool] = []
    key_next = False
    end = 0
    for m in _TOKEN.finditer(value):
        if strict and _GAP.fullmatch(value, end, m.start()) is None:
            raise ValueError(f"not JSON at byte {end}")
        end = m.end()
        tok = m.group()
        c = tok[:1]
        if c in b"[{":
            yield m, path
            in_array.append(c == b"[")
            path.append(0 if c == b"[" else "")
            key_next = c == b"{"
        elif c in b"]}":
            if in_array:
                in_array.pop()
                path.pop()
            elif strict:
                raise ValueError(f"unbalanced {tok!r} at byte {m.start()}")
            key_next = False
        elif c == b",":
            if in_array and in_array[-1]:
                path[-1] = int(path[-1]) + 1
            key_next = bool(in_array) and not in_array[-1]
        elif c == b":":
            key_next = False
        elif key_next:
            path[-1] = _key(tok)
        else:
            yield m, path
    if strict and (in_array or _GAP.fullmatch(value, end) is None):
        raise ValueError("not JSON at the end")


def _tokens(value: bytes, *, strict: bool = False) -> Iterator[tuple[bytes, list[str | int]]]:
    """`_spans`, with each token's bytes."""
    for m, path in _spans(value, strict=strict):
        yield m.group(), path


def _render(path: list[str | int]) -> str:
    """`request.messages[0].content`-style, clipped."""
    out: list[str] = []
    for p in path:
        if isinstance(p, int):
            out.append(f"[{p}]")
        elif len(p) <= MAX_SHOWN_VALUE and _PLAIN_KEY.fullmatch(p):
            out.append(f".{p}" if out else p)
        else:
            out.append(f"[{_show(p)}]")
    return _clip("".join(out)) or "value"


def _too_deep(value: bytes) -> InvalidRequest:
    where = "value"
    for tok, path in _tokens(value):
        if tok[:1] in b"[{" and len(path) >= MAX_NESTING:
            where = _render(path)
            break
    return InvalidRequest(f"{where}: nested more than {MAX_NESTING} levels deep")


def _bad_utf8(value: bytes) -> InvalidRequest:
    """The string that is not UTF-8, by path (a key's bad bytes name its object)."""
    try:
        value.decode()
    except UnicodeDecodeError as exc:
        at = exc.start
    else:  # pragma: no cover - only called when the decoder found bad UTF-8
        at = 0
    where = "value"
    for m, path in _spans(value):
        if m.end() > at:
            where = _render(path)
            break
    return InvalidRequest(f"{where}: not valid UTF-8 JSON: invalid UTF-8 at byte {at}")


def _number_ok(tok: bytes) -> bool:
    """Would the decoder accept this number? (ints up to Python's digit limit, finite floats)"""
    if any(ch in tok for ch in b".eE"):
        return float(tok) not in (float("inf"), float("-inf"))
    limit = sys.get_int_max_str_digits()
    return limit == 0 or len(tok.lstrip(b"-")) <= limit


def _out_of_range(value: bytes, under: str) -> tuple[str, bytes] | None:
    """Path and text of the first number the decoder refuses at or below the path `under`."""
    for tok, path in _tokens(value):
        if tok[:1] not in b'"[{' and not _number_ok(tok):
            where = _render(path)
            if where == under or where.startswith((f"{under}.", f"{under}[")):
                return where, tok
    return None


# -- parsing ---------------------------------------------------------------------------


def _untyped(value: bytes) -> Any:
    try:
        return _RAW.decode(value)
    except (*_UNREADABLE, RecursionError):
        return None


def _lookup(raw: Any, path: str) -> Any:
    cur = raw
    for key, idx in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        try:
            cur = cur[int(idx)] if idx else cur[key]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def _schema_error(value: bytes, msg: str) -> InvalidRequest:
    """A msgspec validation error, restated with the field's path and (clipped) value."""
    m = _PATH.search(msg)
    if m is None:
        return InvalidRequest(f"value: {_clip(msg)}")
    where = m.group("path")
    path = where.lstrip(".") or "value"
    base = msg.split(" - at ")[0]
    if "out of range" in base:
        # msgspec neither shows the number nor, inside `request`/`metadata`, says where.
        found = _out_of_range(value, path.split("[...]")[0])
        if found is not None:
            return InvalidRequest(f"{found[0]}: {base}, got {_clip(found[1].decode())}")
    shown = _lookup(_untyped(value), where)
    field = path.split("[")[0]
    if base.startswith("Invalid enum value") and field in _CHOICES:
        # msgspec echoes the whole bad value here: restate it clipped.
        base = "expected one of " + ", ".join(map(repr, _CHOICES[field]))
    suffix = f", got {_show(shown)}" if shown is not None and "missing" not in base else ""
    return InvalidRequest(f"{path}: {_clip(base)}{suffix}")


def _nests_too_deep(value: bytes) -> bool:
    """Does any part of the value, unknown fields too, nest deeper than MAX_NESTING?

    The typed decode skips unknown fields, so this decodes the whole value untyped and
    walks it without recursion; where even that fails, the token scan decides.
    """
    try:
        todo: list[tuple[Any, int]] = [(_RAW.decode(value), 1)]
    except RecursionError:
        return True
    except _UNREADABLE:  # junk in an unknown field that the typed decode skipped
        return any(tok[:1] in b"[{" and len(path) >= MAX_NESTING for tok, path in _tokens(value))
    while todo:
        obj, depth = todo.pop()
        if depth > MAX_NESTING:
            return True
        for child in obj.values() if type(obj) is dict else obj:
            if type(child) is dict or type(child) is list:  # decoded JSON: exact types
                todo.append((child, depth + 1))
    return False


def parse_request(value: bytes | None) -> Request:
    """Decode and validate one `llm.requests` value; raises InvalidRequest.

    Every reason starts with the offending field's path (`value` for the whole record)
    and a colon, and shows at most MAX_SHOWN_VALUE characters of the value.
    """
    if value is None:
        raise InvalidRequest("value: the record has no value (expected a Request JSON object)")
    try:
        req = REQUEST_DECODER.decode(value)
    except msgspec.ValidationError as exc:
        raise _schema_error(value, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"value: not valid UTF-8 JSON: {_clip(str(exc))}") from None
    except UnicodeDecodeError:
        raise _bad_utf8(value) from None
    except RecursionError:
        raise _too_deep(value) from None
    # Fewer brackets than the limit cannot nest past it: most requests skip the walk.
    if value.count(b"[") + value.count(b"{") > MAX_NESTING and _nests_too_deep(value):
        raise _too_deep(value)
    _check_envelope(req)
    _check_body(req.request)
    return req


def _check_envelope(req: Request) -> None:
    if req.reply_to is not None and not reply_topic_ok(req.reply_to):
        raise InvalidRequest(
            "reply_to: expected a Kafka topic name (1..249 of A-Za-z0-9._-, not '.' or '..', "
            f"not starting with '__'), got {_show(req.reply_to)}"
        )
    if req.deadline_ms is not None and req.deadline_ms > _INT64_MAX:
        raise InvalidRequest(
            "deadline_ms: expected epoch milliseconds that fit 64 bits, "
            f"got {_show(req.deadline_ms)}"
        )
    if req.metadata is not None:
        size = len(_ENCODER.encode(req.metadata))
        if size > MAX_METADATA_BYTES:
            raise InvalidRequest(
                f"metadata: at most {MAX_METADATA_BYTES} bytes as JSON "
                f"(it is echoed on the reply), got {size}"
            )


def _check_body(body: dict[str, Any]) -> None:
    model = body.get("model")
    if (
        not isinstance(model, str)
        or len(model) > _MODEL_NAME_MAX
        or _MODEL_NAME.fullmatch(model) is None
    ):
        raise InvalidRequest(
            f"request.model: expected a model name, alias or 'auto' (1..{_MODEL_NAME_MAX} "
            f"characters matching {_MODEL_NAME.pattern}), got {_show(model)}"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"request.messages: expected a non-empty array, got {_show(messages)}")
    for i, msg in enumerate(messages):
        where = f"request.messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"{where}: expected an object, got {_show(msg)}")
        role = msg.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequest(
                f"{where}.role: expected one of {sorted(_ROLES)}, got {_show(role)}"
            )
        content = msg.get("content")
        if not (isinstance(content, str | list) or (content is None and role == "assistant")):
            raise InvalidRequest(
                f"{where}.content: expected a string or an array, got {_show(content)}"
            )
        for j, part in enumerate(content if isinstance(content, list) else ()):
            # Every provider refuses other parts with a 400: no quota is spent to learn it.
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(
                    f"{where}.content[{j}]: expected an object with a string 'type', "
                    f"got {_show(part)}"
                )
    for field in ("max_tokens", "max_completion_tokens"):
        v = body.get(field)
        if v is not None and (
            not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= _INT64_MAX
        ):
            raise InvalidRequest(
                f"request.{field}: expected a positive 64-bit integer, got {_show(v)}"
            )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"request.stream: expected a boolean, got {_show(stream)}")
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest(f"request.n: only 1 choice per request is supported, got {_show(n)}")


# -- salvage ---------------------------------------------------------------------------


class Salvaged(msgspec.Struct, frozen=True):
    """What can still be read from an invalid value to answer it."""

    id: str
    reply_to: str | None
    tenant: str


class _Envelope(msgspec.Struct):
    """The three top-level fields salvage needs; every other field is skipped unread."""

    id: msgspec.Raw = msgspec.Raw(b"null")
    reply_to: msgspec.Raw = msgspec.Raw(b"null")
    tenant: msgspec.Raw = msgspec.Raw(b"null")


_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)
_SALVAGED_FIELDS: Final = frozenset({"id", "reply_to", "tenant"})


def _envelope(value: bytes) -> dict[str, Any] | None:
    """Top-level `id`, `reply_to`, `tenant` as decoded (any JSON type), or None if unreadable.

    Every other field is skipped unread. A value that nests deeper than MAX_NESTING is
    read by the token scan, up to that point only (whether or not the decoder could go
    deeper, which depends on the caller's stack), so it is answered the same everywhere.
    """
    try:
        env = _ENVELOPE.decode(value)
    except _UNREADABLE:
        return None
    except RecursionError:
        return _scanned_envelope(value)
    if value.count(b"[") + value.count(b"{") > MAX_NESTING and _nests_too_deep(value):
        return _scanned_envelope(value)
    out: dict[str, Any] = {}
    for name in _SALVAGED_FIELDS:
        try:
            out[name] = _RAW.decode(getattr(env, name))
        except (*_UNREADABLE, RecursionError):
            out[name] = None
    return out


def _scanned_envelope(value: bytes) -> dict[str, Any] | None:
    """The envelope's fields that come before the value first nests too deep."""
    if not value.lstrip().startswith(b"{"):
        return None
    out: dict[str, Any] = {}
    try:
        for tok, path in _tokens(value, strict=True):
            if tok[:1] in b"[{" and len(path) >= MAX_NESTING:
                break
            if len(path) == 1 and path[0] in _SALVAGED_FIELDS:
                # The last one wins, as in the decoder; a container is not a string.
                out[str(path[0])] = _STR.decode(tok) if tok[:1] == b'"' else None
    except ValueError:  # DecodeError and UnicodeDecodeError are ValueErrors too
        return None
    return out


def salvage(value: bytes | None) -> Salvaged | None:
    """`id` (and `reply_to`, `tenant`) of a broken value, if they are readable and sane.

    Only the top level is read, so a broken value elsewhere (a wrong type, a number out
    of range, nesting too deep for the decoder) does not stop the answer.
    """
    if not value:
        return None
    found = _envelope(value)
    if found is None:
        return None
    rid, reply_to, tenant = found.get("id"), found.get("reply_to"), found.get("tenant")
    if not isinstance(rid, str) or not 1 <= len(rid) <= 128:
        return None
    if reply_to is not None and not reply_topic_ok(reply_to):
        return None
    if not isinstance(tenant, str) or not 1 <= len(tenant) <= 128:
        tenant = "default"
    return Salvaged(rid, reply_to, tenant)
