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
    "CacheConfig",
    "Config",
    "Deployment",
    "GatewayConfig",
    "KafkaConfig",
    "Limits",
    "LoggingConfig",
    "Model",
    "Price",
    "QuotaConfig",
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
    request_timeout_ms: PositiveInt = 30_000


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
    """A public model name clients use, served by an ordered pool of deployments."""

    name: Name
    deployments: Annotated[list[Name], msgspec.Meta(min_length=1)]
    aliases: list[Name] = msgspec.field(default_factory=list)


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
    # USD per UTC calendar month, from the deployments' price table.
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
    # Optionally hold every call on a quantized deployment this long after its grant (and
    # record it then), for links whose jitter outruns the reports. Costs this much latency.
    quantized_pace_ms: NonNegInt = 0
    # Daily windows aggregate grants into buckets of this many seconds (memory bound).
    day_bucket_s: PositiveInt = 60
    # A 429 without retry-after freezes the deployment this long.
    freeze_default_ms: PositiveInt = 1_000
    # Upstream 429s re-queue the request (not the client's fault) at most this often.
    max_requeues: NonNegInt = 5
    # The quota actor writes its windows and counters to `<internal_prefix>quota` this often.
    checkpoint_interval_ms: PositiveInt = 1_000
    # Budget use (share of the limit) at which an event is logged and published.
    budget_alerts: list[Rate] = msgspec.field(default_factory=lambda: [0.8, 1.0])
    queue_max: PositiveInt = 20_000
    # How often queued asks are re-examined when nothing else wakes the admission loop.
    tick_ms: PositiveInt = 50
    grant_poll_timeout_s: PositiveFloat = 1.0


class CacheConfig(_Section, frozen=True):
    """The exact-match response cache run by the cache actors."""

    enabled: bool = True
    shards: PositiveInt = 2
    ttl_s: PositiveFloat = 3600.0
    max_entries: PositiveInt = 10_000
    max_bytes: PositiveInt = 64 * 1024 * 1024
    # Only answers this deterministic (temperature at or below) are stored by default.
    max_temperature: NonNegFloat = 0.0


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
    # Chunks from upstream within this window go out as one reply (the first is immediate).
    coalesce_ms: NonNegInt = 0
    headroom_refresh_ms: PositiveInt = 250
    # Callers open a connection to every deployment at start (GET /models), so that the
    # first calls are not late; also names a refused key in the log before traffic.
    warm_connections: bool = True
    # Callers send lease settlements and cache entries in one batch per this interval.
    flush_ms: PositiveInt = 20
    drain_timeout_s: PositiveFloat = 30.0
    ray_namespace: str = "quotaflow"


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
