"""The HTTP side of the simulator: aiohttp handlers wiring keys, limits, faults and text.

Order per chat request, as a real provider does it: auth (401), body validation (400),
credit (429 insufficient_quota), rate limits (429, the request does not enter the window),
then the admitted request runs and may fail by injected fault (it still counts).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from aiohttp import web

from pipeline.simulator.faults import FaultPlan, Faults
from pipeline.simulator.keys import KeyRing, bearer_token
from pipeline.simulator.limiter import Limiter, Rejection, Ticket
from pipeline.simulator.openai_errors import (
    error_body,
    insufficient_quota_body,
    invalid_key_body,
    missing_key_body,
    overloaded_body,
    rate_limit_body,
    server_error_body,
)
from pipeline.simulator.requestlog import RequestLog, RequestRecord
from pipeline.simulator.stats import Lane, Totals
from pipeline.simulator.text import completion_tokens_for, finish_reason_for, token_pieces
from pipeline.simulator.validate import BadRequest, ChatRequest, validate_chat_body
from pipeline.simulator.window import Clock
from topics.config import SimFaults, SimKey, SimulatorConfig
from topics.tokens import estimate_prompt_tokens

__all__ = ["Simulator"]

_JSON = "application/json"
_MAX_BODY = 64 * 1024 * 1024
_SHUTDOWN_TIMEOUT_S = 1.0


class _Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class _ChunkChoice(msgspec.Struct):
    index: int
    delta: _Delta
    logprobs: None
    finish_reason: str | None


class _Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Chunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[_ChunkChoice]
    system_fingerprint: str | None = None
    # Present (null until the last chunk) only when stream_options.include_usage is set.
    usage: _Usage | msgspec.UnsetType | None = msgspec.UNSET


@dataclass(slots=True)
class _Call:
    """What happened to one chat request, filled in as it runs and logged at the end."""

    started: float
    client_request_id: str | None
    key: str | None = None
    model: str | None = None
    status: int | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    max_tokens: int | None = None
    charged_tokens: int | None = None
    completion_tokens: int = 0
    fault: str | None = None
    dropped: bool = False


class Simulator:
    """An OpenAI-compatible chat completions server enforcing per (key, model) limits."""

    def __init__(self, config: SimulatorConfig, *, clock: Clock = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._keys = KeyRing(config.keys)  # raises SimulatorError naming a missing env var
        self._lanes: dict[tuple[str, str], Lane] = {}
        for key in config.keys:
            for model in key.models:
                self._lane(key, model)
        self._totals = Totals()
        self._faults = Faults(config.faults)
        # Keys with faults of their own (config, or replaced at run time).
        self._key_faults: dict[str, Faults] = {
            k.api_key_env: Faults(k.faults) for k in config.keys if k.faults is not None
        }
        self._key_timing = {
            k.api_key_env: (
                config.ttft_ms if k.ttft_ms is None else k.ttft_ms,
                config.inter_token_ms if k.inter_token_ms is None else k.inter_token_ms,
            )
            for k in config.keys
        }
        self._seq = itertools.count(1)
        self._request_log: RequestLog | None = None
        self._runner: web.AppRunner | None = None
        self._log = structlog.get_logger("quotaflow.sim")
        self._encoder = msgspec.json.Encoder()
        self.base_url: str | None = None

    # -- lifecycle -------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/stats/reset", self._stats_reset)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/admin/faults", self._set_faults)
        return app

    async def start(self, port: int | None = None) -> str:
        """Serve on `port` (None: config.port, 0: a free port); returns the /v1 base URL."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        if self.config.log_path:
            self._request_log = RequestLog(self.config.log_path)
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port if port is None else port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        self.base_url = f"http://{host}:{bound_port}/v1"
        self._log.info(
            "sim.listening",
            base_url=self.base_url,
            keys=[k.api_key_env for k in self.config.keys],
            lanes=sorted(lane.name for lane in self._lanes.values()),
        )
        return self.base_url

    async def stop(self) -> None:
        """Stop serving (in-flight requests get a moment to finish) and close the log."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            self._log.info("sim.stopped", requests=self._totals.requests)
        if self._request_log is not None:
            self._request_log.close()
            self._request_log = None

    # -- state -----------------------------------------------------------------------

    def _lane(self, key: SimKey, model: str) -> Lane:
        """The (key, model) lane, created on first use; unconfigured models are unlimited."""
        lane = self._lanes.get((key.api_key_env, model))
        if lane is None:
            limits = key.models.get(model)
            limiter = Limiter(
                limits.rpm if limits else None,
                limits.tpm if limits else None,
                quantize_per_second=self.config.quantize_per_second,
                adjust_on_completion=self.config.tpm_adjust_on_completion,
                clock=self._clock,
            )
            lane = Lane(key.api_key_env, model, limiter)
            self._lanes[(key.api_key_env, model)] = lane
        return lane

    def stats(self) -> dict[str, Any]:
        """Totals plus one entry per `KEY_ENV/model` lane (the body of GET /stats)."""
        out = self._totals.snapshot()
        out["by_key_model"] = {
            lane.name: lane.snapshot()
            for lane in sorted(self._lanes.values(), key=lambda lane: lane.name)
        }
        return out

    def reset_stats(self) -> None:
        """Clear counters and window maxima; the windows themselves are kept."""
        self._totals.reset()
        for lane in self._lanes.values():
            lane.reset()

    # -- small handlers --------------------------------------------------------------

    def _json(
        self, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> web.Response:
        body = payload if isinstance(payload, bytes) else self._encoder.encode(payload)
        return web.Response(status=status, body=body, content_type=_JSON, headers=headers)

    async def _healthz(self, request: web.Request) -> web.Response:
        return self._json(200, {"status": "ok"})

    async def _stats(self, request: web.Request) -> web.Response:
        return self._json(200, self.stats())

    async def _stats_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return self._json(200, {"status": "reset"})

    async def _set_faults(self, request: web.Request) -> web.Response:
        """POST /admin/faults `{"api_key_env": ..., "faults": {...} | null}`: a key's faults
        from now on (null: back to `simulator.faults`). For tests of outages and recovery."""
        try:
            raw = msgspec.json.decode(await request.read())
            env = raw["api_key_env"]
            faults = (
                None if raw.get("faults") is None else msgspec.convert(raw["faults"], SimFaults)
            )
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError) as exc:
            return self._json(400, {"error": f"expected {{api_key_env, faults}}: {exc}"})
        if env not in {k.api_key_env for k in self.config.keys}:
            return self._json(404, {"error": f"no simulator key with api_key_env {env!r}"})
        if faults is None:
            self._key_faults.pop(env, None)
        else:
            self._key_faults[env] = Faults(faults)
        self._log.info("sim.faults_set", api_key_env=env, faults=raw.get("faults"))
        return self._json(200, {"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        """GET /v1/models (auth required, as at OpenAI): every model named in the config."""
        headers = {"x-request-id": _request_id()}
        token = bearer_token(request.headers.get("Authorization"))
        if token is None or self._keys.lookup(token) is None:
            body = missing_key_body() if token is None else invalid_key_body(token)
            return self._json(401, body, headers)
        names = sorted({m for key in self.config.keys for m in key.models})
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "quotaflow-sim"} for m in names
        ]
        return self._json(200, {"object": "list", "data": data}, headers)

    # -- chat completions ------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions: serve, then count and log however it ended."""
        call = _Call(time.monotonic(), request.headers.get("X-Client-Request-Id"))
        self._totals.requests += 1
        try:
            response = await self._chat_inner(request, call)
        finally:
            self._record(call)
        return response

    async def _chat_inner(self, request: web.Request, call: _Call) -> web.StreamResponse:
        """Auth, validation, credit, admission, then the (possibly faulty) answer."""
        headers = {"x-request-id": _request_id()}
        token = bearer_token(request.headers.get("Authorization"))
        key = self._keys.lookup(token) if token is not None else None
        if key is None:
            body = missing_key_body() if token is None else invalid_key_body(token)
            return self._reply(call, 401, body, headers)
        call.key = key.api_key_env
        try:
            raw = msgspec.json.decode(await request.read())
        except msgspec.DecodeError:
            body = error_body(
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON.)",
                "invalid_request_error",
                None,
            )
            return self._reply(call, 400, body, headers)
        try:
            req = validate_chat_body(raw)
        except BadRequest as exc:
            model = raw.get("model") if isinstance(raw, dict) else None
            known = self._lanes.get((key.api_key_env, model)) if isinstance(model, str) else None
            if known is not None:
                call.model = model
                headers.update(known.limiter.headers())
            body = error_body(exc.message, "invalid_request_error", None, exc.param)
            return self._reply(call, 400, body, headers)

        lane = self._lane(key, req.model)
        prompt = estimate_prompt_tokens(req.messages)
        charge = prompt + (
            req.max_tokens
            if req.max_tokens is not None
            else completion_tokens_for(None, self.config)
        )
        call.model, call.stream, call.prompt_tokens = req.model, req.stream, prompt
        call.max_tokens = req.max_tokens
        if key.exhausted:
            self._totals.insufficient_quota_429 += 1
            headers.update(lane.limiter.headers())
            return self._reply(call, 429, insufficient_quota_body(), headers)

        admitted = lane.limiter.try_admit(charge)
        if isinstance(admitted, Rejection):
            return self._reject(call, lane, req, admitted, headers)

        call.charged_tokens = charge  # only admitted requests are charged
        lane.admitted += 1
        lane.tokens_charged += charge
        lane.in_flight += 1
        headers.update(lane.limiter.headers())
        plan = self._key_faults.get(key.api_key_env, self._faults).draw()
        call.fault = plan.name
        if plan.failure is not None:
            self._totals.faults[plan.failure] += 1
        if plan.slow_extra_ms:
            self._totals.faults["slow"] += 1
        try:
            if req.stream:
                return await self._stream(request, call, req, plan, headers)
            return await self._complete(request, call, req, plan, headers)
        finally:
            lane.in_flight -= 1
            lane.tokens_refunded += self._settle(lane.limiter, admitted, call)

    def _settle(self, limiter: Limiter, ticket: Ticket, call: _Call) -> int:
        """Correct the window entry to prompt + tokens actually produced."""
        return limiter.finish(ticket, (call.prompt_tokens or 0) + call.completion_tokens)

    def _reject(
        self,
        call: _Call,
        lane: Lane,
        req: ChatRequest,
        rejection: Rejection,
        headers: dict[str, str],
    ) -> web.Response:
        """429 rate_limit_exceeded with retry-after(-ms), unless waiting cannot help."""
        lane.rejected_429 += 1
        self._totals.rate_limited_429 += 1
        if rejection.too_large:
            self._totals.too_large_429 += 1
        headers.update(lane.limiter.headers())
        if rejection.retry_after_ms is not None:
            headers["retry-after"] = str(max(1, math.ceil(rejection.retry_after_ms / 1000)))
            headers["retry-after-ms"] = str(rejection.retry_after_ms)
        return self._reply(call, 429, rate_limit_body(req.model, rejection), headers)

    def _timing(self, call: _Call) -> tuple[int, int]:
        """(time to first token, time between tokens) in ms for the call's key."""
        cfg = self.config
        return self._key_timing.get(call.key or "", (cfg.ttft_ms, cfg.inter_token_ms))

    def _reply(
        self, call: _Call, status: int, body: bytes, headers: dict[str, str]
    ) -> web.Response:
        call.status = status
        return web.Response(status=status, body=body, content_type=_JSON, headers=headers)

    async def _fail_or_wait(
        self, call: _Call, plan: FaultPlan, headers: dict[str, str]
    ) -> web.Response | None:
        """Wait out the time to first token; answer a 500/503 fault instead if drawn."""
        await _sleep_ms(self._timing(call)[0] + plan.slow_extra_ms)
        if plan.failure == "error_500":
            return self._reply(call, 500, server_error_body(), headers)
        if plan.failure == "error_503":
            return self._reply(call, 503, overloaded_body(), headers)
        return None

    async def _complete(
        self,
        request: web.Request,
        call: _Call,
        req: ChatRequest,
        plan: FaultPlan,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        failed = await self._fail_or_wait(call, plan, headers)
        if failed is not None:
            return failed
        cfg = self.config
        inter_token_ms = self._timing(call)[1]
        n = completion_tokens_for(req.max_tokens, cfg)
        if plan.failure == "drop_mid_stream":
            await _sleep_ms((n // 2) * inter_token_ms)
            call.completion_tokens = n // 2
            return _drop(request, call)
        await _sleep_ms(n * inter_token_ms)
        call.completion_tokens = n
        prompt = call.prompt_tokens or 0
        text = "".join(token_pieces(req.model, req.messages, n))
        payload = {
            "id": f"chatcmpl-sim-{next(self._seq)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason_for(req.max_tokens, cfg),
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": n,
                "total_tokens": prompt + n,
            },
            "system_fingerprint": None,
        }
        return self._reply(call, 200, self._encoder.encode(payload), headers)

    async def _stream(
        self,
        request: web.Request,
        call: _Call,
        req: ChatRequest,
        plan: FaultPlan,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        if plan.failure in ("error_500", "error_503"):
            failed = await self._fail_or_wait(call, plan, headers)
            assert failed is not None
            return failed
        cfg = self.config
        n = completion_tokens_for(req.max_tokens, cfg)
        pieces = token_pieces(req.model, req.messages, n)
        prompt = call.prompt_tokens or 0
        usage_field: _Usage | msgspec.UnsetType | None = (
            None if req.include_usage else msgspec.UNSET
        )
        cid, created = f"chatcmpl-sim-{next(self._seq)}", int(time.time())

        def chunk(delta: _Delta, finish: str | None = None) -> bytes:
            choice = _ChunkChoice(0, delta, None, finish)
            body = _Chunk(
                cid, "chat.completion.chunk", created, req.model, [choice], None, usage_field
            )
            return b"data: " + self._encoder.encode(body) + b"\n\n"

        headers.update({"content-type": "text/event-stream", "cache-control": "no-cache"})
        response = web.StreamResponse(status=200, headers=headers)
        call.status = 200
        try:
            await response.prepare(request)
            ttft_ms, inter_token_ms = self._timing(call)
            await _sleep_ms(ttft_ms + plan.slow_extra_ms)
            await response.write(chunk(_Delta(role="assistant", content="")))
            # A drop cuts after about half the tokens (n // 2 < n, so always inside them).
            cut = n // 2 if plan.failure == "drop_mid_stream" else None
            for i, piece in enumerate(pieces):
                if i == cut:
                    _drop(request, call)
                    return response
                if i:
                    await _sleep_ms(inter_token_ms)
                await response.write(chunk(_Delta(content=piece)))
                call.completion_tokens = i + 1
            await response.write(chunk(_Delta(), finish_reason_for(req.max_tokens, cfg)))
            if req.include_usage:
                usage = _Usage(prompt, n, prompt + n)
                last = _Chunk(cid, "chat.completion.chunk", created, req.model, [], None, usage)
                await response.write(b"data: " + self._encoder.encode(last) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            call.fault = call.fault or "client_disconnected"
        return response

    def _record(self, call: _Call) -> None:
        """Count the finished call and append it to the JSONL log."""
        if call.status is not None:
            self._totals.by_status[call.status] += 1
        if call.dropped:
            self._totals.dropped += 1
        if self._request_log is None:
            return
        self._request_log.write(
            RequestRecord(
                ts_ms=int(time.time() * 1000),
                key=call.key,
                model=call.model,
                status=call.status,
                stream=call.stream,
                prompt_tokens=call.prompt_tokens,
                max_tokens=call.max_tokens,
                charged_tokens=call.charged_tokens,
                completion_tokens=call.completion_tokens,
                fault=call.fault,
                client_request_id=call.client_request_id,
                duration_ms=round((time.monotonic() - call.started) * 1000, 1),
            )
        )


def _request_id() -> str:
    return f"req_{os.urandom(16).hex()}"


async def _sleep_ms(ms: int) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


def _drop(request: web.Request, call: _Call) -> web.StreamResponse:
    """Abort the connection: the client sees it close without a complete response."""
    call.dropped = True
    if not call.stream:
        call.status = None
    transport = request.transport
    if transport is not None:
        transport.abort()
    return web.StreamResponse()
