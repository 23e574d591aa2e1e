"""`quotaflow serve`: an OpenAI-compatible HTTP front door onto the Kafka pipeline.

`POST /v1/chat/completions` (SSE streaming and not) and `GET /v1/models[/{id}]`, so an
application moves to quotaflow by changing `base_url` in the `openai` SDK. Each HTTP
request becomes one Request on `topics.requests`; its replies come back on the front
door's own reply topic through one shared `QuotaflowClient` (one producer, one reply
consumer, replies fanned out per request id and deduplicated by (id, seq)).

Mapping: `X-Request-Id` (else a fresh id) is the Request `id`; the `Authorization` bearer
key identifies the tenant when tenants have keys (and is forwarded as the Kafka
`authorization` header), else `X-Quotaflow-Tenant` or "default" names it;
`X-Quotaflow-{Priority,Tier,Task,Cache,Deadline-Ms}` set the optional fields. Errors are
OpenAI-shaped JSON with the status of `pipeline._http_replies` (never 429).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import signal
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final, cast

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from pipeline._admin import ensure_topics
from pipeline._frontdoor_settings import DEFAULT_REPLY_TOPIC, FrontDoorSettings, settings_from
from pipeline._http_replies import (
    StreamDiverged,
    StreamSplicer,
    completion_as_chunk,
    completion_from_chunks,
    error_body,
    error_headers,
    http_error,
    sse_data,
)
from pipeline._validate import MAX_SHOWN_VALUE, parse_request
from pipeline.client import QuotaflowClient
from topics.config import Config, resolve_secret
from topics.errors import (
    InvalidRequest,
    RequestError,
    RequestTooLarge,
    Unauthorized,
    UnknownModel,
)
from topics.logs import configure_logging
from topics.specs import REQUEST_ENCODER, TopicSpec, topic_specs
from topics.wire import (
    ChunkReply,
    CompletionReply,
    DoneReply,
    ErrorReply,
    Reply,
    Request,
    ResetReply,
)

__all__ = [
    "DEFAULT_REPLY_TOPIC",
    "FrontDoor",
    "FrontDoorSettings",
    "frontdoor_topic_specs",
    "model_ids",
    "serve",
    "settings_from",
]

HEADER_REQUEST_ID: Final = "X-Request-Id"
HEADER_TENANT: Final = "X-Quotaflow-Tenant"
# Request field -> the header that sets it.
_FIELD_HEADERS: Final = {
    "priority": "X-Quotaflow-Priority",
    "tier": "X-Quotaflow-Tier",
    "task": "X-Quotaflow-Task",
    "cache": "X-Quotaflow-Cache",
    "deadline_ms": "X-Quotaflow-Deadline-Ms",
}
_INT_FIELDS: Final = frozenset({"priority", "deadline_ms"})
_HEADER_OF: Final = {"id": HEADER_REQUEST_ID, "tenant": HEADER_TENANT, **_FIELD_HEADERS}
_JSON: Final = "application/json"
_SSE_DONE: Final = b"data: [DONE]\n\n"
_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder()


def model_ids(config: Config) -> list[str]:
    """What clients may put in `model`: every public name and alias, then "auto"."""
    return [name for m in config.models for name in (m.name, *m.aliases)] + ["auto"]


def frontdoor_topic_specs(
    config: Config, reply_topic: str = DEFAULT_REPLY_TOPIC
) -> list[TopicSpec]:
    """The topics the front door needs beyond the gateway's: its reply topic, like `responses`."""
    if reply_topic in {s.name for s in topic_specs(config)}:
        return []
    t = config.topics
    return [
        TopicSpec(
            name=reply_topic,
            partitions=t.partitions,
            replication_factor=t.replication_factor,
            cleanup_policy="delete",
            retention_ms=t.retention_ms,
        )
    ]


def _bearer(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _show(value: str) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 3] + "..."


class _Sse:
    """An SSE response opened on the first event, so errors before it are plain HTTP."""

    def __init__(self, request: web.Request, request_id: str) -> None:
        self._request = request
        self._request_id = request_id
        self.response: web.StreamResponse | None = None

    async def send(self, data: bytes) -> None:
        if self.response is None:
            self.response = web.StreamResponse(
                status=200,
                headers={
                    "content-type": "text/event-stream",
                    "cache-control": "no-cache",
                    # Proxies such as nginx would otherwise buffer the stream.
                    "x-accel-buffering": "no",
                    "x-request-id": self._request_id,
                },
            )
            await self.response.prepare(self._request)
        await self.response.write(data)

    async def end(self) -> web.StreamResponse:
        assert self.response is not None
        await self.response.write_eof()
        return self.response


class FrontDoor:
    """The aiohttp app and the one QuotaflowClient behind it."""

    def __init__(self, config: Config, settings: FrontDoorSettings) -> None:
        self.config = config
        self.settings = settings
        # Tenant keys, read once; they are compared, forwarded on Kafka, never logged.
        self._tenant_keys: list[tuple[str, bytes]] = [
            (t.name, resolve_secret(t.api_key_env, what=f"tenants[{t.name}].api_key_env").encode())
            for t in config.tenants
            if t.api_key_env
        ]
        self._model_ids = model_ids(config)
        self._known_models = frozenset(self._model_ids)
        self._client = QuotaflowClient(
            config.kafka.bootstrap_servers,
            requests_topic=config.topics.requests,
            reply_topic=settings.reply_topic,
            client_id=f"{config.kafka.client_id}-frontdoor",
        )
        self._in_flight: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._log = structlog.get_logger("quotaflow.frontdoor")
        self.base_url: str | None = None

    # -- lifecycle -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_body_bytes, middlewares=[self._json_errors]
        )
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self, port: int | None = None) -> str:
        """Create the reply topic if missing, start the client, listen; returns the /v1 URL."""
        if self.config.topics.create_missing:
            await ensure_topics(
                self.config, extra=frontdoor_topic_specs(self.config, self.settings.reply_topic)
            )
        await self._client.start()
        runner = web.AppRunner(
            self.app(), access_log=None, shutdown_timeout=self.settings.drain_timeout_s
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.settings.host, self.settings.port if port is None else port)
        await site.start()
        bound_port = runner.addresses[0][1]
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        self.base_url = f"http://{host}:{bound_port}/v1"
        self._log.info(
            "frontdoor.listening",
            base_url=self.base_url,
            reply_topic=self.settings.reply_topic,
            keyed_tenants=len(self._tenant_keys),
        )
        return self.base_url

    async def stop(self) -> None:
        """Stop listening (requests in flight get `drain_timeout_s`), then stop the client."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._client.stop()

    # -- small handlers --------------------------------------------------------------

    def _error(
        self,
        request: web.Request,
        request_id: str,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after_ms: int | None = None,
    ) -> web.Response:
        request["qf_code"] = code
        headers = {
            "x-request-id": request_id,
            **error_headers(retryable=retryable, retry_after_ms=retry_after_ms),
        }
        return web.Response(
            status=http_error(code).status,
            body=error_body(code, message),
            content_type=_JSON,
            headers=headers,
        )

    def _raised(self, request: web.Request, request_id: str, exc: RequestError) -> web.Response:
        return self._error(
            request,
            request_id,
            exc.code,
            exc.message,
            retryable=exc.retryable,
            retry_after_ms=exc.retry_after_ms,
        )

    @web.middleware
    async def _json_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Unknown paths and methods answer in OpenAI's error shape too."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            codes = {404: "not_found", 405: "method_not_allowed"}
            if exc.status not in codes:
                raise
            rid = request.headers.get(HEADER_REQUEST_ID) or uuid.uuid4().hex
            return self._error(
                request, rid, codes[exc.status], f"{request.method} {request.path}: {exc.reason}"
            )

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the public names, aliases and "auto", in OpenAI's list shape."""
        rid = uuid.uuid4().hex
        try:
            self._authenticate(request.headers)
        except RequestError as exc:
            return self._raised(request, rid, exc)
        data = [_model_object(m) for m in self._model_ids]
        return web.json_response({"object": "list", "data": data}, headers={"x-request-id": rid})

    async def _model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: one model, or 404 `unknown_model`."""
        rid = uuid.uuid4().hex
        name = request.match_info["model"]
        try:
            self._authenticate(request.headers)
            if name not in self._known_models:
                raise UnknownModel(f"model {name!r} is not served here (GET /v1/models lists them)")
        except RequestError as exc:
            return self._raised(request, rid, exc)
        return web.json_response(_model_object(name), headers={"x-request-id": rid})

    # -- chat completions ------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions: validate, publish, relay the replies; log the outcome."""
        started = time.monotonic()
        rid = request.headers.get(HEADER_REQUEST_ID) or uuid.uuid4().hex
        response: web.StreamResponse | None = None
        try:
            response = await self._chat_inner(request, rid)
            return response
        finally:
            self._log.info(
                "frontdoor.request",
                request_id=rid,
                tenant=request.get("qf_tenant"),
                model=request.get("qf_model"),
                stream=request.get("qf_stream"),
                status=response.status if response is not None else None,
                code=request.get("qf_code"),
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )

    async def _chat_inner(self, request: web.Request, rid: str) -> web.StreamResponse:
        try:
            tenant, key = self._authenticate(request.headers)
            request["qf_tenant"] = tenant
            body = await self._read_body(request)
            req = self._build(body, rid, tenant, request.headers)
        except RequestError as exc:
            return self._raised(request, rid, exc)
        stream = bool(req.request.get("stream"))
        request["qf_model"], request["qf_stream"] = req.request["model"], stream
        if rid in self._in_flight:
            return self._error(
                request,
                rid,
                "request_in_flight",
                f"{HEADER_REQUEST_ID} {rid!r} is already being answered on this server",
            )
        self._in_flight.add(rid)
        try:
            # A generator (the client's replies()); registered now, before publishing.
            replies = cast(AsyncGenerator[Reply, None], self._client.replies(rid))
            try:
                await self._client.send(req, api_key=key)
            except MessageSizeTooLargeError:
                return self._raised(
                    request, rid, RequestTooLarge("the request exceeds Kafka's message size limit")
                )
            except KafkaError as exc:
                return self._error(
                    request,
                    rid,
                    "upstream_unavailable",
                    f"could not publish the request to Kafka: {type(exc).__name__}",
                    retryable=True,
                )
            async with contextlib.aclosing(replies):
                if stream:
                    return await self._stream(request, rid, replies)
                return await self._complete(request, rid, replies)
        finally:
            self._in_flight.discard(rid)

    def _authenticate(self, headers: Mapping[str, str]) -> tuple[str, str | None]:
        """(tenant, key to forward): the key names the tenant when tenants have keys."""
        named = headers.get(HEADER_TENANT)
        if not self._tenant_keys:
            return named or "default", None
        token = _bearer(headers.get("Authorization"))
        if token is None:
            raise Unauthorized("missing header 'Authorization: Bearer <tenant key>'")
        presented = token.encode()
        tenant: str | None = None
        for name, key in self._tenant_keys:  # no early exit: every key is compared
            if hmac.compare_digest(presented, key) and tenant is None:
                tenant = name
        if tenant is None:
            raise Unauthorized("the Authorization key is not the key of any tenant")
        if named is not None and named != tenant:
            raise Unauthorized(f"{HEADER_TENANT} {named!r} is not the tenant of this key")
        return tenant, token

    async def _read_body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise RequestTooLarge(
                f"the request body exceeds {self.settings.max_body_bytes} bytes"
            ) from None
        try:
            body = _DECODER.decode(raw)
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidRequest(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _build(
        self, body: dict[str, Any], rid: str, tenant: str, headers: Mapping[str, str]
    ) -> Request:
        """The Request for `body`, checked as the gateway checks it, before it is published."""
        fields: dict[str, Any] = {}
        for field, header in _FIELD_HEADERS.items():
            raw = headers.get(header)
            if raw is None:
                continue
            if field in _INT_FIELDS:
                try:
                    fields[field] = int(raw)
                except ValueError:
                    raise InvalidRequest(
                        f"{header}: expected an integer, got {_show(raw)}"
                    ) from None
            else:
                fields[field] = raw
        try:
            req = self._client.build(body, id=rid, tenant=tenant, **fields)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(_name_header(str(exc), headers)) from None
        try:
            parse_request(REQUEST_ENCODER.encode(req))  # the gateway's own checks
        except InvalidRequest as exc:
            # The client wrote the body: name its fields as it knows them.
            raise InvalidRequest(exc.message.removeprefix("request.")) from None
        model = req.request["model"]
        if model not in self._known_models:
            raise UnknownModel(
                f"model {model!r} is not served here (known: {', '.join(self._model_ids)})"
            )
        return req

    # -- relaying replies ------------------------------------------------------------

    async def _stream(
        self, request: web.Request, rid: str, replies: AsyncGenerator[Reply, None]
    ) -> web.StreamResponse:
        """Chunks as SSE `data:` events, then `[DONE]`; an error after the first event ends
        the stream with an `{"error": ...}` event (the SDK raises `openai.APIError`)."""
        sse = _Sse(request, rid)
        splicer = StreamSplicer()
        code, message, retryable, retry_after_ms = "internal", "no terminal reply", True, None
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                async for reply in replies:
                    if isinstance(reply, ChunkReply | CompletionReply):
                        chunk = (
                            reply.chunk
                            if isinstance(reply, ChunkReply)
                            else completion_as_chunk(reply.completion)
                        )
                        out = splicer.feed(chunk)
                        if out is not None:
                            await sse.send(sse_data(out))
                    elif isinstance(reply, ResetReply):
                        splicer.reset(reply.reason)
                    elif isinstance(reply, DoneReply):
                        await sse.send(_SSE_DONE)
                        return await sse.end()
                    elif isinstance(reply, ErrorReply):
                        err = reply.error
                        code, message = err.code, err.message
                        retryable, retry_after_ms = err.retryable, err.retry_after_ms
                        break
        except TimeoutError:
            code, message, retryable = "timeout", self._timeout_message(), False
        except StreamDiverged as exc:
            code, message, retryable = "stream_reset", str(exc), False
        except ConnectionResetError:
            request["qf_code"] = "client_disconnected"
            return sse.response or web.Response(status=499)
        if sse.response is None:
            return self._error(
                request, rid, code, message, retryable=retryable, retry_after_ms=retry_after_ms
            )
        request["qf_code"] = code
        with contextlib.suppress(ConnectionResetError):
            await sse.send(sse_data(error_body(code, message)))
            return await sse.end()
        return sse.response

    async def _complete(
        self, request: web.Request, rid: str, replies: AsyncGenerator[Reply, None]
    ) -> web.Response:
        """The `completion` object (or one assembled from chunks), or the error."""
        completion: dict[str, Any] | None = None
        chunks: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                async for reply in replies:
                    if isinstance(reply, ChunkReply):
                        chunks.append(reply.chunk)
                    elif isinstance(reply, CompletionReply):
                        completion = reply.completion
                    elif isinstance(reply, ResetReply):
                        completion, chunks = None, []
                    elif isinstance(reply, DoneReply):
                        body = completion or completion_from_chunks(chunks, reply)
                        headers = {
                            "x-request-id": rid,
                            "x-quotaflow-model": reply.model,
                            "x-quotaflow-deployment": reply.deployment or "",
                            "x-quotaflow-cache": reply.cache,
                        }
                        return web.Response(
                            body=_ENCODER.encode(body), content_type=_JSON, headers=headers
                        )
                    elif isinstance(reply, ErrorReply):
                        err = reply.error
                        return self._error(
                            request,
                            rid,
                            err.code,
                            err.message,
                            retryable=err.retryable,
                            retry_after_ms=err.retry_after_ms,
                        )
        except TimeoutError:
            return self._error(request, rid, "timeout", self._timeout_message())
        return self._error(request, rid, "internal", "the reply stream ended without a terminal")

    def _timeout_message(self) -> str:
        return (
            f"no answer within the front door's {self.settings.request_timeout_s:g}s request "
            "timeout; the request may still finish in the gateway"
        )


def _name_header(message: str, headers: Mapping[str, str]) -> str:
    """msgspec names `$.priority`; the client set it with a header: name that and its value."""
    m = re.search(r"`\$\.(\w+)`", message)
    field = m.group(1) if m else None
    header = _HEADER_OF.get(field or "")
    if header is None:
        return message
    base = message.split(" - at ")[0]
    value = headers.get(header)
    return f"{header}: {base}" + (f", got {_show(value)}" if value is not None else "")


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "quotaflow"}


async def serve(config: Config, settings: FrontDoorSettings) -> int:
    """`quotaflow serve`: listen until SIGINT/SIGTERM, let requests in flight finish, exit 0."""
    configure_logging(config.logging)
    door = FrontDoor(config, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        url = await door.start()
        print(
            f"quotaflow front door listening on {url} (kafka {config.kafka.bootstrap_servers}, "
            f"replies on {settings.reply_topic})",
            flush=True,
        )
        await stop.wait()
    finally:
        await door.stop()
    return 0
