"""What a cached answer is keyed by: eligibility, the exact key and the semantic scope.

The exact key hashes the canonical form of everything that can change the answer: the
resolved public model, the tenant scope and the whole request body except the fields in
`NOT_IN_KEY`, which shape delivery or accounting only (and `model`, replaced by the
resolved name, so an alias and its model share entries). Canonical: keys sorted, `null`
values and parameters at their OpenAI default (`DEFAULT_PARAMS`) left out, integral
floats written as integers (`temperature: 0` and `0.0` are one key).

The semantic scope is the same hash with the text of the last user turn taken out: two
requests may share a semantic answer only when everything else (system prompt, earlier
turns, parameters, model, tenant scope) is identical. With the semantic cache on, a key
starts with its scope's digits, so that one shard holds (and searches) a whole scope.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

from topics.config import CacheConfig
from topics.wire import Request

__all__ = [
    "DEFAULT_PARAMS",
    "NOT_IN_KEY",
    "ROUTE_HEX",
    "SemanticParts",
    "cache_key",
    "cacheable",
    "canonical",
    "semantic_parts",
    "tenant_scope",
]

# Delivery and accounting, not the answer.
NOT_IN_KEY: Final = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
    }
)
# OpenAI's defaults: a parameter sent at its default is the same request as one without.
DEFAULT_PARAMS: Final[dict[str, Any]] = {
    "temperature": 1,
    "top_p": 1,
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
}
_DEFAULT_TEMPERATURE: Final = 1.0
# Leading hex digits of a key that choose its shard.
ROUTE_HEX: Final = 8
_CANON: Final = msgspec.json.Encoder(order="sorted")
# Stands for the last user turn's text in the semantic scope's canonical form.
_SEMANTIC_SLOT: Final = {"$semantic": "last user turn"}


class SemanticParts(msgspec.Struct, frozen=True):
    """A request split for the semantic cache: the scope hash and the text compared."""

    scope: str
    text: str


def cacheable(request: Request, config: CacheConfig) -> bool:
    """May this request be answered from, and its answer stored to, the cache?

    Only deterministic-enough requests (temperature at or below `max_temperature`, one
    choice) whose answer a replay reproduces: no logprobs, no audio output.
    """
    if not config.enabled or request.cache == "bypass":
        return False
    body = request.request
    temperature = body.get("temperature", _DEFAULT_TEMPERATURE)
    if temperature is None:
        temperature = _DEFAULT_TEMPERATURE
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        return False
    if temperature > config.max_temperature:
        return False
    if body.get("n", 1) not in (1, None) or body.get("logprobs"):
        return False
    modalities = body.get("modalities")
    return not (body.get("audio") or (isinstance(modalities, list) and "audio" in modalities))


def tenant_scope(tenant: str, config: CacheConfig) -> list[str]:
    """Whose answers a tenant may get: its own, or the shared scope's if it opted in."""
    if tenant in config.semantic.shared_tenants:
        return ["shared"]
    return ["tenant", tenant]


def _norm(value: Any) -> Any:
    """Numbers in one spelling (1.0 -> 1), recursively; everything else as it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def canonical(body: dict[str, Any]) -> dict[str, Any]:
    """The body as the key sees it (see the module docstring)."""
    out: dict[str, Any] = {}
    for k, v in body.items():
        if k in NOT_IN_KEY or v is None:
            continue
        v = _norm(v)
        if k in DEFAULT_PARAMS and v == DEFAULT_PARAMS[k] and type(v) is type(DEFAULT_PARAMS[k]):
            continue
        out[k] = v
    return out


def _hash(model: str, scope: list[str], body: dict[str, Any]) -> str:
    return hashlib.sha256(_CANON.encode({"model": model, "scope": scope, "body": body})).hexdigest()


def cache_key(
    request: Request, model: str, *, scope: list[str] | None = None, semantic: bool = False
) -> str:
    """Hash of the canonical form of everything that changes the answer.

    `scope` (from `tenant_scope`) defaults to the request's own tenant. With `semantic`,
    the first `ROUTE_HEX` digits are the semantic scope's instead: every request of one
    scope then goes to the same shard (`shard_of` reads them), the one that indexes it.
    """
    tenant = scope or ["tenant", request.tenant]
    body = canonical(request.request)
    key = _hash(model, tenant, body)
    if semantic:
        parts = _split(body, model, tenant)
        if parts is not None:
            key = parts.scope[:ROUTE_HEX] + key[ROUTE_HEX:]
    return key


def _text_of(content: Any) -> str | None:
    """A message's text: a string, or text parts only (an image would go unseen)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                return None
            text = part.get("text")
            if not isinstance(text, str):
                return None
            texts.append(text)
        return "\n".join(texts)
    return None


def semantic_parts(request: Request, model: str, *, scope: list[str]) -> SemanticParts | None:
    """The last user turn's text and the hash of everything else; None when the request
    has no user turn made of text alone (nothing to compare)."""
    return _split(canonical(request.request), model, scope)


def _split(body: dict[str, Any], model: str, scope: list[str]) -> SemanticParts | None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for i in range(len(messages) - 1, -1, -1):
        msg = messages[i]
        if isinstance(msg, dict) and msg.get("role") == "user":
            text = _text_of(msg.get("content"))
            if text is None or not text.strip():
                return None
            rest = [*messages[:i], {**msg, "content": _SEMANTIC_SLOT}, *messages[i + 1 :]]
            return SemanticParts(scope=_hash(model, scope, {**body, "messages": rest}), text=text)
    return None
