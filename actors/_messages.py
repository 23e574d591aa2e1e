"""What the actors pass each other (through Ray, in batches); not part of the wire contract.

Batches cross Ray as `Packed` lists: one msgpack blob per batch instead of Ray pickling
every Struct (measured here: a call carrying 500 asks took 4.0 ms with the Structs
pickled, 1.5 ms packed, 0.9 ms for an empty call).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Generic, TypeVar

import msgspec

from actors._idempotency import IdemClaim, IdemClaimed, IdemRecord
from topics.errors import ErrorCode
from topics.wire import Request

__all__ = [
    "Admitted",
    "Ask",
    "CacheEntry",
    "CacheLookup",
    "Decision",
    "DeploymentState",
    "Finished",
    "Grant",
    "Job",
    "Observation",
    "Packed",
    "Queued",
    "Refusal",
    "Route",
    "RouteAsk",
    "Settlement",
]


class RouteAsk(msgspec.Struct, frozen=True):
    """Which model and deployments should serve this request?"""

    ticket: int
    model: str
    tenant: str
    tier: str | None = None
    task: str | None = None
    # Deployments that just failed this request: ranked after every other candidate.
    avoid: tuple[str, ...] = ()
    # Set only when needed (model "auto", or a cost bound): the prompt to score and price.
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = 0
    max_cost_usd: float | None = None


class Route(msgspec.Struct, frozen=True):
    """The selector's answer: a public model and its deployments, best first, or an error.

    `candidates` holds the deployments to use, best first; `served` names the public model
    each of `candidates` and then of `fallback` serves (what `done.model` says).
    """

    ticket: int
    model: str | None
    candidates: tuple[str, ...] = ()
    error: ErrorCode | None = None
    message: str | None = None
    served: tuple[str, ...] = ()
    # The rest of the fallback chain, for the quota actor to use when every candidate is
    # open or exhausted by then (the selector's view is up to a refresh old).
    fallback: tuple[str, ...] = ()

    def model_for(self, deployment: str) -> str | None:
        """The public model a grant on `deployment` serves."""
        for dep, model in zip((*self.candidates, *self.fallback), self.served, strict=False):
            if dep == deployment:
                return model
        return self.model


class DeploymentState(msgspec.Struct, frozen=True):
    """What the quota actor tells the selectors about one deployment, every refresh."""

    headroom: float
    # "closed", "open" or "half_open"
    breaker: str = "closed"
    # EWMA of the time to first token of its successful calls (None before the first).
    ttft_ewma_ms: float | None = None
    frozen: bool = False
    exhausted: bool = False


class Ask(msgspec.Struct, frozen=True):
    """A request for quota: `prompt_tokens + max_tokens` on one of `candidates`."""

    ticket: int
    owner: str
    tenant: str
    priority: int
    deadline_ms: int | None
    candidates: tuple[str, ...]
    prompt_tokens: int
    max_tokens: int
    # Used only when every candidate is open or exhausted (the model's fallbacks).
    fallback: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


class Grant(msgspec.Struct, frozen=True, tag=True):
    """Quota reserved on `deployment`; `lease` is returned in a Settlement."""

    ticket: int
    deployment: str
    lease: int
    reserved_tokens: int
    queued_ms: float
    # Wall-clock ms before which the call must not be sent (quantized deployments).
    not_before_ms: float | None = None


class Refusal(msgspec.Struct, frozen=True, tag=True):
    ticket: int
    code: ErrorCode
    message: str
    retry_after_ms: int | None = None


class Queued(msgspec.Struct, frozen=True, tag=True):
    ticket: int


Decision = Grant | Refusal | Queued
Admitted = Grant | Refusal


class Observation(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the provider said about its limits on one call (`x-ratelimit-*`, 429s)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    # "rate_limited": a 429 that waiting fixes; "exhausted": credit gone (insufficient_quota).
    refused: str | None = None
    retry_after_ms: int | None = None


class Settlement(msgspec.Struct, frozen=True):
    """Give back a lease: correct its token entries to what was really used.

    `used_tokens` is what the provider counts against TPM (prompt estimate or real prompt,
    whichever is larger, plus completion); the split prices the call for budgets.
    """

    lease: int
    used_tokens: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    observed: Observation | None = None
    # Let a restarted quota actor free the concurrency, and count the tenant's use, of
    # leases it no longer knows.
    deployment: str = ""
    tenant: str = ""
    # For the deployment's breaker: "ok", "failed" (5xx, timeout, connection, cut
    # stream), "rate_limited", "exhausted", "client_error" (the request's own fault), or
    # "unused" (a grant given back without a call). Only "ok" and "failed" move it.
    outcome: str = "ok"
    ttft_ms: float | None = None
    # Prompt tokens the provider served from its prompt cache (priced lower).
    cached_tokens: int = 0


class Job(msgspec.Struct, frozen=True):
    """One granted request for an upstream caller."""

    ticket: int
    request: Request
    reply_to: str
    model: str
    grant: Grant
    prompt_tokens: int
    received_ms: float
    cache_key: str | None
    attempt: int = 1
    # The reply stream continues at this seq (earlier attempts used the ones below).
    start_seq: int = 0
    # Send a `reset` before anything else: an earlier attempt may have sent chunks.
    reset_first: bool = False
    # The public model each deployment of the route serves (fallbacks included).
    served: dict[str, str] | None = None


class Finished(msgspec.Struct, frozen=True):
    """A request whose terminal reply is acknowledged by Kafka, or one to try again.

    `status` "retry": no terminal reply was sent; the ingress routes and asks quota for
    it again after `retry_after_ms`, avoiding `deployment`, continuing at `next_seq`.
    """

    ticket: int
    status: str
    upstream_calls: int = 0
    next_seq: int = 0
    retry_after_ms: int = 0
    deployment: str | None = None


class CacheEntry(msgspec.Struct, frozen=True):
    """A stored answer, enough to replay it as chunks or as a completion."""

    key: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    upstream_model: str
    model: str
    stored_at: float
    extra: dict[str, Any] | None = None
    # From a caller: the call whose answer this key waited for ended without one (an
    # error): requests waiting for it (single flight) run themselves; nothing is stored.
    failed: bool = False
    # Filled in by the cache shard: the semantic scope and the last user turn's text.
    scope: str | None = None
    prompt: str | None = None

    @property
    def size_bytes(self) -> int:
        prompt = len(self.prompt.encode()) if self.prompt else 0
        return len(self.key) + len(self.text.encode()) + prompt + 256


class CacheLookup(msgspec.Struct, frozen=True):
    """One request's exact-cache lookup, as the ingress sends it to a shard."""

    ticket: int
    key: str
    request: Request
    reply_to: str
    received_ms: float
    # The resolved public model (semantic thresholds and TTL are per model).
    model: str = ""
    # Where a replay's seqs start and whether a `reset` goes first: a resent id whose
    # earlier run left replies on the topic continues past them (`IdemClaimed`).
    seq: int = 0
    reset_first: bool = False


# -- batches across Ray --------------------------------------------------------------

_T = TypeVar("_T")

# The element type of each kind of batch; a kind's decoder is built once, on first use.
_KINDS: Final[dict[str, Any]] = {
    "ask": Ask,
    "decision": Decision,
    "admitted": Admitted,
    "settlement": Settlement,
    "route_ask": RouteAsk,
    "route": Route,
    "job": Job,
    "finished": Finished,
    "cache_entry": CacheEntry,
    "cache_lookup": CacheLookup,
    "idem_claim": IdemClaim,
    "idem_claimed": IdemClaimed,
    "idem_record": IdemRecord,
}
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODERS: dict[str, msgspec.msgpack.Decoder[list[Any]]] = {}


class Packed(list[_T], Generic[_T]):
    """A list of one kind of message that pickles as a single msgpack blob.

    It is a list everywhere else, so an actor method takes a plain list just as well (as
    tests pass them); only the Ray hop sees the difference.
    """

    __slots__ = ("kind",)

    def __init__(self, kind: str, items: Iterable[_T] = ()) -> None:
        if kind not in _KINDS:
            raise ValueError(f"Packed kind {kind!r} is not one of {sorted(_KINDS)}")
        super().__init__(items)
        self.kind = kind

    def __reduce__(self) -> tuple[Any, tuple[str, Any]]:
        items = list(self)
        try:
            return (_unpack, (self.kind, _ENCODER.encode(items)))
        except (OverflowError, TypeError):
            # What msgpack cannot hold (a request body may carry an integer beyond 64
            # bits: JSON allows it): this batch is pickled item by item, as Ray would.
            return (_plain, (self.kind, items))


def _plain(kind: str, items: list[Any]) -> Packed[Any]:
    return Packed(kind, items)


def _unpack(kind: str, blob: bytes) -> Packed[Any]:
    dec = _DECODERS.get(kind)
    if dec is None:
        dec = _DECODERS[kind] = msgspec.msgpack.Decoder(list[_KINDS[kind]])  # type: ignore[valid-type]
    return Packed(kind, dec.decode(blob))
