"""One upstream call with the openai SDK (`max_retries=0`): stream chunks to Kafka as they come.

The SDK's raw streaming response gives the headers and the SSE lines; each `data:` line
is decoded once with msgspec and forwarded as a `chunk` reply, so the body the client
sees is the upstream's own chunk object. Upstream failures become one error reply with
a code from CONTRACT.md; the gateway, not the SDK, decides about retries.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import httpx2 as httpx
import msgspec
import openai
import structlog
from aiohttp.helpers import get_env_proxy_for_url
from openai._constants import DEFAULT_CONNECTION_LIMITS

# Private to the SDK (what `openai.DefaultAioHttpClient` builds on); the pinned version has
# it and tests/test_units.py fails if it moves.
from openai._vendor.httpx_aiohttp.transport import AiohttpTransport
from yarl import URL

from actors._coalesce import ChunkCoalescer
from actors._messages import Job, Observation
from actors._replies import ReplyStream, cost_usd
from actors._retry import retry_delay_ms, retryable_status
from topics.config import Config, Deployment, resolve_secret
from topics.errors import ErrorCode
from topics.wire import Timing

__all__ = ["Outcome", "Upstream", "env_proxy", "observe", "parse_go_duration"]

log = structlog.get_logger("quotaflow.caller")

_DECODE: Final = msgspec.json.Decoder()
# Sent upstream with every call: provider logs (and the simulator's) name the request.
_REQUEST_ID_HEADER: Final = "X-Client-Request-Id"
# Keys the gateway sets itself when calling upstream.
_OWN_KEYS: Final = frozenset({"model", "messages", "stream"})


@dataclass
class Outcome:
    """What happened upstream: enough to settle quota, fill the cache and report."""

    status: str  # "done" or an error code
    deployment: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    upstream_model: str = ""
    upstream_calls: int = 1
    observed: Observation | None = None
    # Prompt tokens the provider served from its prompt cache.
    cached_tokens: int = 0
    # For the deployment's breaker (see Settlement.outcome).
    breaker: str = "ok"
    # Upstream time to first token (from sending the call), for the latency estimate.
    upstream_ttft_ms: float | None = None
    # status "retry": wait this long, then route and ask quota again.
    retry_after_ms: int = 0
    # A terminal error that a resend may fix (not kept for idempotent replay).
    retryable: bool = False
    # status "done": what the done reply said (for the callers' metrics).
    timing: Timing | None = None
    cost_usd: float = 0.0


class _Failure(Exception):
    """An upstream failure already mapped to a contract error code.

    `breaker` says how it counts for the deployment's breaker; `retryable` whether the
    same request can succeed when tried again.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool,
        retry_after_ms: int | None = None,
        breaker: str = "failed",
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms
        self.breaker = breaker


def _cached_tokens(usage: dict[str, Any]) -> int:
    """`usage.prompt_tokens_details.cached_tokens` (OpenAI's prompt cache), 0 if absent."""
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return 0
    value = details.get("cached_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _seconds_until(deadline_ms: int | None) -> float | None:
    """Seconds from now to an epoch-ms deadline (None: no deadline)."""
    return None if deadline_ms is None else max(0.0, deadline_ms / 1000.0 - time.time())


def _retry_after_ms(headers: httpx.Headers) -> int | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return int(float(ms))
        except ValueError:
            pass
    sec = headers.get("retry-after")
    if sec is not None:
        try:
            return int(float(sec) * 1000)
        except ValueError:
            return None
    return None


_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")


def parse_go_duration(text: str) -> float | None:
    """Seconds in an OpenAI-style reset value (`1s`, `6m0s`, `9.816s`, `120ms`)."""
    parts = _GO_PART.findall(text.strip())
    if not parts or "".join(a + b for a, b in parts) != text.strip():
        return None
    return sum(float(num) * _GO_UNITS[unit] for num, unit in parts)


def _int_header(headers: httpx.Headers, name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def observe(headers: httpx.Headers, *, refused: str | None = None) -> Observation:
    """The provider's view of our limits from `x-ratelimit-*` and retry headers."""
    reset_r = headers.get("x-ratelimit-reset-requests")
    reset_t = headers.get("x-ratelimit-reset-tokens")
    return Observation(
        limit_requests=_int_header(headers, "x-ratelimit-limit-requests"),
        remaining_requests=_int_header(headers, "x-ratelimit-remaining-requests"),
        reset_requests_s=parse_go_duration(reset_r) if reset_r else None,
        limit_tokens=_int_header(headers, "x-ratelimit-limit-tokens"),
        remaining_tokens=_int_header(headers, "x-ratelimit-remaining-tokens"),
        reset_tokens_s=parse_go_duration(reset_t) if reset_t else None,
        refused=refused,
        retry_after_ms=_retry_after_ms(headers) if refused else None,
    )


def _map_status_error(exc: openai.APIStatusError, dep: Deployment) -> _Failure:
    status = exc.status_code
    err: dict[str, Any] = {}
    if isinstance(exc.body, dict):
        inner = exc.body.get("error", exc.body)
        if isinstance(inner, dict):
            err = inner
    upstream_msg = str(err.get("message") or exc.message)
    etype = str(err.get("type") or err.get("code") or "")
    where = f"deployment {dep.name!r} answered HTTP {status}"
    if status == 429 and "insufficient_quota" in (etype, str(err.get("code"))):
        return _Failure(
            "upstream_unavailable",
            f"{where} (insufficient_quota): {upstream_msg}",
            retryable=False,
            breaker="exhausted",
        )
    if status == 429:
        return _Failure(
            "upstream_unavailable",
            f"{where} (rate limited): {upstream_msg}",
            retryable=True,
            retry_after_ms=_retry_after_ms(exc.response.headers),
            breaker="rate_limited",
        )
    if status in (400, 404, 413, 422):
        return _Failure(
            "invalid_request", f"{where}: {upstream_msg}", retryable=False, breaker="client_error"
        )
    if status in (401, 403):
        # Say which credential failed, never what it is. The request is not at fault, the
        # deployment is: it counts against the breaker, so traffic moves to a fallback.
        return _Failure(
            "upstream_error",
            f"{where}: the credential in ${dep.api_key_env} was refused",
            retryable=False,
        )
    if retryable_status(status):
        return _Failure(
            "upstream_unavailable",
            f"{where}: {upstream_msg}",
            retryable=True,
            retry_after_ms=_retry_after_ms(exc.response.headers),
        )
    return _Failure(
        "upstream_error", f"{where}: {upstream_msg}", retryable=False, breaker="client_error"
    )


def env_proxy(base_url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy the environment sets for `base_url` (HTTPS_PROXY, NO_PROXY...), or none.

    Read once per client, as httpx does. aiohttp's `trust_env` reads the environment and
    `~/.netrc` again for every request, on a thread whose GIL hand-offs stalled the
    caller's event loop (BENCHMARKS.md, throughput notes of 2026-12-02).
    """
    try:
        return get_env_proxy_for_url(URL(base_url))
    except LookupError:
        return None, None


class _TracedTransport(AiohttpTransport):
    """The SDK's aiohttp transport, its session built with our trace (send reports)."""

    def __init__(
        self, trace: Callable[[], aiohttp.TraceConfig], base_url: str, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._make_trace = trace
        self._base_url = base_url

    def get_client(self) -> aiohttp.ClientSession:
        # As the base class builds it (TCP only), plus the trace, and the environment's
        # proxy for the deployment as httpx would use it by default (httpx itself ignores
        # it once a transport is given).
        connector = aiohttp.TCPConnector(
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
            limit=self.limits.max_connections or 0,
        )
        proxy, proxy_auth = env_proxy(self._base_url)
        return aiohttp.ClientSession(
            connector=connector,
            trace_configs=[self._make_trace()],
            proxy=proxy,
            proxy_auth=proxy_auth,
        )


class Upstream:
    """One `AsyncOpenAI` client per deployment, created on first use."""

    def __init__(self, config: Config, on_send: Callable[[str], None] | None = None) -> None:
        self._config = config
        # Called with the request id at the moment its HTTP request is really sent.
        self._on_send = on_send
        self._deployments = {d.name: d for d in config.deployments}
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self._retry = config.resilience.retry
        self._coalesce_ms = config.gateway.coalesce_ms
        self._transport = config.gateway.upstream_transport

    def _new_client(self, dep: Deployment) -> openai.AsyncOpenAI:
        http: httpx.AsyncClient
        if self._transport == "aiohttp":
            # httpx's pool scans its connections at every request start and response end:
            # its cost per call grew with the calls in flight (BENCHMARKS.md, throughput).
            transport = _TracedTransport(
                self._trace, dep.base_url, limits=DEFAULT_CONNECTION_LIMITS
            )
            http = openai.DefaultAioHttpClient(transport=transport)
        else:
            http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [self._httpx_sent]})
        return openai.AsyncOpenAI(
            base_url=dep.base_url,
            api_key=resolve_secret(dep.api_key_env, what=f"deployments[{dep.name}].api_key_env"),
            max_retries=0,  # hidden SDK retries would spend quota the gateway did not grant
            timeout=httpx.Timeout(dep.timeout_s, connect=dep.connect_timeout_s),
            http_client=http,
        )

    def client(self, dep: Deployment) -> openai.AsyncOpenAI:
        c = self._clients.get(dep.name)
        if c is None:
            c = self._clients[dep.name] = self._new_client(dep)
        return c

    def _trace(self) -> aiohttp.TraceConfig:
        """Reports each call when its request headers are written: after a pooled
        connection was taken or opened, which is when the provider sees it."""
        tc = aiohttp.TraceConfig()
        on_send = self._on_send

        async def sent(
            _session: aiohttp.ClientSession,
            _ctx: object,
            params: aiohttp.TraceRequestHeadersSentParams,
        ) -> None:
            request_id = params.headers.get(_REQUEST_ID_HEADER)
            if request_id is not None and on_send is not None:
                on_send(request_id)

        tc.on_request_headers_sent.append(sent)
        return tc

    async def _httpx_sent(self, request: httpx.Request) -> None:
        """httpx's request hook runs before a pooled connection is taken or opened: the
        send is reported from httpcore's trace when the request headers are written."""
        request_id = request.headers.get(_REQUEST_ID_HEADER)
        if request_id is None or self._on_send is None:
            return
        on_send = self._on_send

        async def trace(event: str, info: dict[str, Any]) -> None:
            if event.endswith(".send_request_headers.started"):
                on_send(request_id)

        request.extensions = {**request.extensions, "trace": trace}

    async def warm(self, *, connect: bool) -> None:
        """Create every deployment's client now (a missing key fails here, named).

        With `connect`, also open a connection with `GET /models`, which chat rate limits
        do not count: the first call of a process otherwise pays the connection set-up,
        late enough to disturb the pacing of quantized deployments. A refusal is logged
        naming the deployment and its key variable; the gateway still starts.
        """
        clients = [(dep, self.client(dep)) for dep in self._deployments.values()]
        if not connect:
            return
        results = await asyncio.gather(
            *(c.models.list() for _, c in clients), return_exceptions=True
        )
        for (dep, _), result in zip(clients, results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "upstream_warmup_failed",
                    deployment=dep.name,
                    key_env=dep.api_key_env,
                    error=type(result).__name__,
                )

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()

    async def run(self, job: Job, out: ReplyStream) -> Outcome:
        """Call upstream for `job`, writing its replies to `out`.

        Ends with a terminal reply, or with status "retry" and none: the failure can
        succeed on another attempt, the attempt budget and the deadline allow one, so
        the ingress routes and queues the request again (a `reset` is sent first when
        this attempt's chunks reached the reply topic).
        """
        dep = self._deployments[job.grant.deployment]
        body = job.request.request
        stream = bool(body.get("stream"))
        outcome = Outcome(status="done", deployment=dep.name)
        deadline = job.request.deadline_ms
        if deadline is not None and time.time() * 1000.0 >= deadline:
            outcome.breaker = "unused"
            outcome.upstream_calls = 0
            return await self._fail(
                job,
                out,
                outcome,
                _Failure(
                    "deadline_exceeded",
                    f"deadline_ms {deadline} passed before the upstream call",
                    retryable=False,
                    breaker="unused",
                ),
            )
        try:
            async with asyncio.timeout(_seconds_until(deadline)):
                if stream:
                    await self._stream(job, dep, body, out, outcome)
                else:
                    await self._complete(job, dep, body, out, outcome)
        except TimeoutError:
            # The deadline passed mid-call: leaving the SDK's context closed the connection,
            # which cancels the upstream generation.
            failure = _Failure(
                "deadline_exceeded",
                f"deadline_ms {deadline} passed during the upstream call to {dep.name!r}",
                retryable=False,
                breaker="ok" if out.sent_chunks else "unused",
            )
            return await self._fail(job, out, outcome, failure)
        except _Failure as f:
            return await self._retry_or_fail(job, out, outcome, f)
        except openai.APIStatusError as exc:
            failure = _map_status_error(exc, dep)
            refused = None
            if exc.status_code == 429:
                refused = "rate_limited" if failure.retryable else "exhausted"
                # Our windows should have prevented this; the book freezes the deployment
                # and counts it.
                log.warning("upstream_429", request_id=job.request.id, deployment=dep.name)
            outcome.observed = observe(exc.response.headers, refused=refused)
            return await self._retry_or_fail(job, out, outcome, failure)
        # aiohttp's own errors too: the SDK's transport maps most, not every one.
        except (openai.APIConnectionError, httpx.TransportError, aiohttp.ClientError) as exc:
            lost = _Failure(
                "upstream_unavailable",
                f"deployment {dep.name!r}: {type(exc).__name__} talking to upstream",
                retryable=True,
            )
            return await self._retry_or_fail(job, out, outcome, lost)
        return outcome

    async def _retry_or_fail(self, job: Job, out: ReplyStream, o: Outcome, f: _Failure) -> Outcome:
        """Retry when it can help and is allowed, else the terminal error."""
        o.breaker = f.breaker
        delay: int | None = None
        if f.retryable:
            # A 429's retry-after is the deployment's freeze in the quota book, not a
            # wait for this request, which may go elsewhere at once.
            wait = None if f.breaker == "rate_limited" else f.retry_after_ms
            delay = retry_delay_ms(job.attempt, self._retry, retry_after_ms=wait)
            deadline = job.request.deadline_ms
            if (
                delay is not None
                and deadline is not None
                and time.time() * 1000.0 + delay >= deadline
            ):
                delay = None
        if delay is None:
            return await self._fail(job, out, o, f)
        log.info(
            "upstream_retry",
            request_id=job.request.id,
            tenant=job.request.tenant,
            deployment=o.deployment,
            attempt=job.attempt,
            code=f.code,
            error=f.message,
            retry_in_ms=delay,
        )
        if out.sent_chunks:
            await out.reset(f"upstream failed mid-stream ({f.code}); retrying")
        await out.flush()
        o.status = "retry"
        o.retry_after_ms = delay
        return o

    def _kwargs(
        self, job: Job, dep: Deployment, body: dict[str, Any], stream: bool
    ) -> dict[str, Any]:
        extra = {k: v for k, v in body.items() if k not in _OWN_KEYS}
        if stream:
            # Usage is needed to settle quota; the chunk is dropped if the client did not ask.
            opts = dict(extra.get("stream_options") or {})
            opts["include_usage"] = True
            extra["stream_options"] = opts
        return {
            "model": dep.model,
            "messages": body["messages"],
            "stream": stream,
            "extra_body": extra,
            "extra_headers": {_REQUEST_ID_HEADER: job.request.id},
        }

    async def _stream(
        self, job: Job, dep: Deployment, body: dict[str, Any], out: ReplyStream, o: Outcome
    ) -> None:
        client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        first_ms: float | None = None
        parts: list[str] = []
        api = self.client(dep).chat.completions.with_streaming_response
        called_ms = time.time() * 1000.0
        coalescer = ChunkCoalescer(out, self._coalesce_ms)
        ended = False
        try:
            async with api.create(**self._kwargs(job, dep, body, True)) as resp:
                o.observed = observe(resp.headers)
                async for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue  # SSE comments and keep-alives (DeepSeek sends these)
                    data = line[5:].strip()
                    if data == "[DONE]" or ended:
                        # Read on to the end of the body rather than break: a response
                        # left unread closes its connection, and every call would then
                        # open a new one (measured: 50 of 50 calls).
                        ended = True
                        continue
                    chunk = _DECODE.decode(data)
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk:
                        raise _Failure(
                            "upstream_error",
                            f"deployment {dep.name!r} sent an error mid-stream: {chunk['error']}",
                            retryable=True,
                        )
                    o.upstream_model = str(chunk.get("model") or o.upstream_model)
                    usage = chunk.get("usage")
                    if isinstance(usage, dict):
                        o.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        o.cached_tokens = _cached_tokens(usage)
                        o.completion_tokens = int(usage.get("completion_tokens") or 0)
                    choices = chunk.get("choices") or []
                    if choices:
                        c0 = choices[0]
                        content = (c0.get("delta") or {}).get("content")
                        if content:
                            parts.append(content)
                        if c0.get("finish_reason"):
                            o.finish_reason = c0["finish_reason"]
                    elif not client_wants_usage:
                        continue
                    if first_ms is None:
                        first_ms = time.time() * 1000.0
                        o.upstream_ttft_ms = first_ms - called_ms
                    await coalescer.add(chunk)
            await coalescer.close()
        except BaseException:
            await coalescer.discard()
            raise
        if o.finish_reason is None:
            raise _Failure(
                "upstream_unavailable",
                f"deployment {dep.name!r}: stream ended without a finish_reason",
                retryable=True,
            )
        o.text = "".join(parts)
        await self._done(job, dep, out, o, first_ms)

    async def _complete(
        self, job: Job, dep: Deployment, body: dict[str, Any], out: ReplyStream, o: Outcome
    ) -> None:
        api = self.client(dep).chat.completions.with_streaming_response
        called_ms = time.time() * 1000.0
        async with api.create(**self._kwargs(job, dep, body, False)) as resp:
            o.observed = observe(resp.headers)
            raw = await resp.read()
        completion = _DECODE.decode(raw)
        if not isinstance(completion, dict):
            raise _Failure(
                "upstream_error", f"deployment {dep.name!r} sent a non-object body", retryable=True
            )
        usage = completion.get("usage") or {}
        o.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        o.cached_tokens = _cached_tokens(usage)
        o.completion_tokens = int(usage.get("completion_tokens") or 0)
        o.upstream_model = str(completion.get("model") or "")
        choices = completion.get("choices") or []
        if choices:
            o.finish_reason = choices[0].get("finish_reason")
            o.text = str((choices[0].get("message") or {}).get("content") or "")
        first_ms = time.time() * 1000.0
        o.upstream_ttft_ms = first_ms - called_ms
        await out.completion(completion)
        await self._done(job, dep, out, o, first_ms)

    async def _done(
        self, job: Job, dep: Deployment, out: ReplyStream, o: Outcome, first_ms: float | None
    ) -> None:
        now_ms = time.time() * 1000.0
        o.cost_usd = cost_usd(dep.price, o.prompt_tokens, o.completion_tokens, o.cached_tokens)
        o.timing = Timing(
            queued_ms=round(job.grant.queued_ms, 3),
            ttft_ms=None if first_ms is None else round(first_ms - job.received_ms, 3),
            total_ms=round(now_ms - job.received_ms, 3),
        )
        await out.done(
            finish_reason=o.finish_reason,
            prompt_tokens=o.prompt_tokens,
            completion_tokens=o.completion_tokens,
            model=job.model,
            deployment=dep.name,
            attempts=job.attempt,
            cost=o.cost_usd,
            timing=o.timing,
            metadata=job.request.metadata,
        )

    async def _fail(self, job: Job, out: ReplyStream, o: Outcome, f: _Failure) -> Outcome:
        o.breaker = f.breaker
        o.retryable = f.retryable
        log.warning(
            "upstream_failed",
            request_id=job.request.id,
            tenant=job.request.tenant,
            deployment=o.deployment,
            code=f.code,
            error=f.message,
        )
        if out.sent_chunks:
            await out.reset(f"upstream failed mid-stream: {f.code}")
        await out.error(
            f.code,
            f.message,
            retryable=f.retryable,
            retry_after_ms=f.retry_after_ms,
            metadata=job.request.metadata,
            model=job.model,
            deployment=o.deployment,
        )
        o.status = f.code
        return o
