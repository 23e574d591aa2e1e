"""`quotaflow serve` (issue 7): the OpenAI-compatible front door, driven by the real SDK.

Unit tests cover the pure mapping (error codes to HTTP, chunks across a `reset`); the
integration tests start `quotaflow serve` as a process against the session stack and
talk to it only through `openai.AsyncOpenAI`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from openai.types.chat import ChatCompletionMessageParam

from pipeline._frontdoor_settings import FrontDoorSettings, option_name, settings_from
from pipeline._http_replies import (
    HTTP_ONLY_CODES,
    StreamDiverged,
    StreamSplicer,
    completion_as_chunk,
    completion_from_chunks,
    error_headers,
    http_error,
)
from pipeline.frontdoor import model_ids
from pipeline.kafka_local import free_port
from pipeline.simulator import completion_tokens_for, expected_text, finish_reason_for
from tests.conftest import CAPPED_DAILY_TOKENS, CAPPED_TENANT, TPM_LANE, Stack
from topics.errors import ERROR_CODES, ConfigError
from topics.specs import USAGE_DECODER
from topics.wire import DoneReply, TokenUsage, Usage

SIM_MODEL = "sim-small"  # the upstream model behind `fast` in the session config
ANSWER_TIMEOUT_S = 60.0
START_TIMEOUT_S = 90.0
READY = b"quotaflow front door listening on"

# -- unit: the mapping ---------------------------------------------------------------

# The table: what each wire error code must be over HTTP.
WANTED_STATUS = {
    "invalid_request": 400,
    "unauthorized": 401,
    "unknown_model": 404,
    "deadline_exceeded": 504,
    "request_too_large": 413,
    "quota_exceeded": 402,
    "upstream_unavailable": 503,
    "upstream_error": 502,
    "internal": 500,
}


def test_every_error_code_has_its_status_and_none_is_429() -> None:
    assert set(WANTED_STATUS) == set(ERROR_CODES)
    for code, status in WANTED_STATUS.items():
        assert http_error(code).status == status, code
    statuses = [http_error(c).status for c in (*ERROR_CODES, *HTTP_ONLY_CODES)]
    assert 429 not in statuses
    assert http_error("no-such-code").status == WANTED_STATUS["internal"]


def test_retry_hints_follow_the_reply() -> None:
    after_ms = 1_500
    headers = error_headers(retryable=True, retry_after_ms=after_ms)
    assert headers["x-should-retry"] == "true"
    assert headers["retry-after-ms"] == str(after_ms)
    assert int(headers["retry-after"]) * 1000 >= after_ms
    assert error_headers(retryable=False, retry_after_ms=None) == {"x-should-retry": "false"}


def _chunk(content: str | None = None, *, role: bool = False, finish: str | None = None) -> Any:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": SIM_MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _attempt(text: str, cuts: list[int], finish: str | None = "stop") -> list[Any]:
    """A stream of `text` cut at `cuts`: a role chunk, the pieces, a finish chunk."""
    pieces = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)]) if b > a]
    out = [_chunk("", role=True), *(_chunk(p) for p in pieces)]
    return out + ([_chunk(finish=finish)] if finish else [])


def _seen(forwarded: list[Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in forwarded if c)


def _relay(splicer: StreamSplicer, chunks: list[Any]) -> list[Any]:
    return [out for c in chunks if (out := splicer.feed(c)) is not None]


def test_splicer_without_reset_forwards_every_chunk_unchanged() -> None:
    chunks = _attempt("alpha bravo charlie", [5, 11])
    assert _relay(StreamSplicer(), chunks) == chunks


def test_reset_before_any_text_is_invisible() -> None:
    text = "alpha bravo"
    splicer = StreamSplicer()
    first = _relay(splicer, [_chunk("", role=True)])
    splicer.reset("retry")
    second = _relay(splicer, _attempt(text, [5]))
    roles = [c for c in first + second if "role" in c["choices"][0]["delta"]]
    assert len(roles) == 1
    assert _seen(first + second) == text


def test_reset_after_text_continues_when_the_retry_repeats_it() -> None:
    text = "alpha bravo charlie delta"
    splicer = StreamSplicer()
    first = _relay(splicer, _attempt(text, [5, 11], finish=None)[:3])  # "alpha", " bravo"
    splicer.reset("upstream dropped the stream")
    # The retry cuts the same text elsewhere, one cut inside what was already sent.
    second = _relay(splicer, _attempt(text, [3, 14]))
    assert _seen(first + second) == text
    assert second[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("role" not in c["choices"][0]["delta"] for c in second)


@pytest.mark.parametrize(
    ("retry", "finish"),
    [("alpha brave new world", "stop"), ("alpha", "stop")],
    ids=["differs", "ends-early"],
)
def test_reset_after_text_fails_when_the_retry_differs(retry: str, finish: str) -> None:
    sent = "alpha bravo "
    splicer = StreamSplicer()
    _relay(splicer, _attempt(sent, [6], finish=None))
    splicer.reset("fallback")
    with pytest.raises(StreamDiverged, match=str(len(sent))):
        _relay(splicer, _attempt(retry, [], finish=finish))


def test_reset_after_tool_calls_cannot_be_spliced() -> None:
    splicer = StreamSplicer()
    tool = _chunk()
    tool["choices"][0]["delta"]["tool_calls"] = [{"index": 0, "function": {"name": "f"}}]
    assert splicer.feed(tool) is tool
    with pytest.raises(StreamDiverged):
        splicer.reset("retry")


def test_completion_and_chunks_convert_both_ways() -> None:
    text, usage = "alpha bravo", TokenUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    done = DoneReply(
        id="r", seq=3, finish_reason="length", usage=usage, model="fast", deployment=None
    )
    completion = completion_from_chunks(_attempt(text, [5], finish="length"), done)
    assert completion["choices"][0]["message"]["content"] == text
    assert completion["choices"][0]["finish_reason"] == done.finish_reason
    assert completion["usage"]["total_tokens"] == usage.total_tokens
    chunk = completion_as_chunk(completion)
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["delta"]["content"] == text


def test_settings_errors_name_the_cli_option() -> None:
    assert settings_from(port=None) == FrontDoorSettings()
    with pytest.raises(ConfigError, match=option_name("request_timeout_s")):
        settings_from(request_timeout_s=0)
    with pytest.raises(ConfigError, match="--port"):
        settings_from(port=70_000)


# -- integration: `quotaflow serve` against the session stack -----------------------


@contextlib.contextmanager
def _serving(config_path: Path, log: Path) -> Iterator[str]:
    """`quotaflow serve` as a child process on a free port; yields its /v1 base URL."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "pipeline.cli", "serve"),
                *("--config", str(config_path), "--port", str(port)),
            ],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        give_up = time.monotonic() + START_TIMEOUT_S
        while READY not in log.read_bytes():
            assert proc.poll() is None, f"serve exited with {proc.returncode}; see {log}"
            assert time.monotonic() < give_up, f"serve not ready in {START_TIMEOUT_S}s; see {log}"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, f"serve exited with {proc.returncode} on SIGTERM; see {log}"


@pytest.fixture(scope="module")
def frontdoor(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("frontdoor") / "serve.log"
    with _serving(stack.config_path, log) as url:
        yield url


@pytest.fixture
async def oai(frontdoor: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=frontdoor, api_key="not-checked", max_retries=0, timeout=ANSWER_TIMEOUT_S
    )
    yield client
    await client.close()


def _messages(prompt: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": prompt}]


def _expected(stack: Stack, prompt: str, max_tokens: int | None) -> str:
    sim = stack.config.simulator
    assert sim is not None
    messages = [{"role": "user", "content": prompt}]  # what _messages(prompt) sends
    return expected_text(SIM_MODEL, messages, completion_tokens_for(max_tokens, sim))


async def _usage_of(stack: Stack, request_id: str) -> Usage:
    """The `llm.usage` record of `request_id`, read from the beginning until it shows."""
    topic = stack.config.topics.usage
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        partitions = await producer.partitions_for(topic)  # waits for the topic's metadata
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        give_up = time.monotonic() + ANSWER_TIMEOUT_S
        while time.monotonic() < give_up:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for rec in records:
                    usage = USAGE_DECODER.decode(rec.value)
                    if usage.id == request_id:
                        return usage
        raise AssertionError(f"no usage record for {request_id} in {ANSWER_TIMEOUT_S}s")
    finally:
        await consumer.stop()


@pytest.mark.integration
async def test_non_streamed_completion_is_the_simulators_answer(
    stack: Stack, oai: openai.AsyncOpenAI
) -> None:
    prompt, max_tokens = "Summarise our refund policy.", 12
    resp = await oai.chat.completions.create(
        model="fast", messages=_messages(prompt), max_tokens=max_tokens
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.content == _expected(stack, prompt, max_tokens)
    sim = stack.config.simulator
    assert sim is not None
    assert resp.choices[0].finish_reason == finish_reason_for(max_tokens, sim)
    assert resp.usage is not None
    assert resp.usage.completion_tokens == completion_tokens_for(max_tokens, sim)


@pytest.mark.integration
async def test_streamed_completion_is_the_simulators_answer(
    stack: Stack, oai: openai.AsyncOpenAI
) -> None:
    prompt, max_tokens = "Where is my parcel?", 10
    stream = await oai.chat.completions.create(
        model="small", messages=_messages(prompt), max_tokens=max_tokens, stream=True
    )
    chunks = [chunk async for chunk in stream]  # ends at `data: [DONE]`
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected(stack, prompt, max_tokens)
    assert len(chunks) > 2  # really streamed, not one blob
    sim = stack.config.simulator
    assert sim is not None
    assert chunks[-1].choices[0].finish_reason == finish_reason_for(max_tokens, sim)


@pytest.mark.integration
async def test_models_lists_names_aliases_and_auto(stack: Stack, oai: openai.AsyncOpenAI) -> None:
    listed = [m.id async for m in oai.models.list()]
    assert listed == model_ids(stack.config)
    assert "auto" in listed
    one = await oai.models.retrieve(stack.config.models[0].name)
    assert one.id == stack.config.models[0].name
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("no-such-model")


@pytest.mark.integration
async def test_unknown_model_is_404(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await oai.chat.completions.create(model="no-such-model", messages=_messages("hi"))
    assert info.value.code == "unknown_model"
    assert "no-such-model" in info.value.message


@pytest.mark.integration
async def test_bad_bodies_and_headers_are_400(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model="fast", messages=[])
    assert info.value.code == "invalid_request"
    assert "messages" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model="fast", messages=_messages("hi"), max_tokens=0)
    assert "max_tokens" in info.value.message
    bad_priority = "11"
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model="fast",
            messages=_messages("hi"),
            extra_headers={"X-Quotaflow-Priority": bad_priority},
        )
    assert "X-Quotaflow-Priority" in info.value.message
    assert bad_priority in info.value.message


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_passed_deadline_is_504(oai: openai.AsyncOpenAI, stream: bool) -> None:
    passed_ms = int(time.time() * 1000) - 1_000
    with pytest.raises(openai.InternalServerError) as info:
        await oai.chat.completions.create(
            model="fast",
            messages=_messages("too late"),
            stream=stream,
            extra_headers={"X-Quotaflow-Deadline-Ms": str(passed_ms)},
        )
    assert info.value.status_code == WANTED_STATUS["deadline_exceeded"]
    assert info.value.code == "deadline_exceeded"
    assert info.value.response.headers["x-should-retry"] == "false"


@pytest.mark.integration
async def test_gateway_refusals_keep_their_status(stack: Stack, oai: openai.AsyncOpenAI) -> None:
    # A tenant budget that can never fit: 402, not 429.
    with pytest.raises(openai.APIStatusError) as info:
        await oai.chat.completions.create(
            model="fast",
            messages=_messages("big answer"),
            max_tokens=CAPPED_DAILY_TOKENS + 1,
            extra_headers={"X-Quotaflow-Tenant": CAPPED_TENANT},
        )
    assert info.value.status_code == WANTED_STATUS["quota_exceeded"]
    assert info.value.code == "quota_exceeded"
    # A request no deployment of the model can ever take: 413.
    with pytest.raises(openai.APIStatusError) as info:
        await oai.chat.completions.create(
            model=TPM_LANE.model, messages=_messages("huge"), max_tokens=TPM_LANE.tpm + 1
        )
    assert info.value.status_code == WANTED_STATUS["request_too_large"]
    # The upstream refuses the deployment's key: 502, naming the variable, never the key.
    with pytest.raises(openai.APIStatusError) as info:
        await oai.chat.completions.create(model="broken", messages=_messages("hi"))
    assert info.value.status_code == WANTED_STATUS["upstream_error"]


@pytest.mark.integration
async def test_request_id_and_tenant_headers_reach_the_pipeline(
    stack: Stack, oai: openai.AsyncOpenAI
) -> None:
    rid, tenant, prompt = f"fd-{uuid.uuid4().hex}", "frontdoor-tenant", "Which tenant am I?"
    headers = {"X-Request-Id": rid, "X-Quotaflow-Tenant": tenant}
    raw = await oai.chat.completions.with_raw_response.create(
        model="fast", messages=_messages(prompt), extra_headers=headers
    )
    assert raw.headers["x-request-id"] == rid
    assert raw.headers["x-quotaflow-model"] == "fast"
    first = raw.parse().choices[0].message.content
    assert first == _expected(stack, prompt, None)
    usage = await _usage_of(stack, rid)
    assert usage.tenant == tenant
    # The same id again (a client retry) is answered again, not left waiting.
    again = await oai.chat.completions.create(
        model="fast", messages=_messages(prompt), extra_headers=headers
    )
    assert again.choices[0].message.content == first


@pytest.mark.integration
async def test_tenant_keys_map_to_authorization(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tenant, key_env = "fd-keyed", "QF_FD_TENANT_KEY"
    os.environ.setdefault(key_env, "sk-tenant-" + secrets.token_urlsafe(18))
    raw = yaml.safe_load(stack.config_path.read_text())
    raw["tenants"] = [*raw.get("tenants", []), {"name": tenant, "api_key_env": key_env}]
    home = tmp_path_factory.mktemp("frontdoor-keyed")
    path = home / "keyed.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with _serving(path, home / "serve.log") as url:
        clients = {
            name: openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
            for name, key in (("right", os.environ[key_env]), ("wrong", "sk-wrong-key-000000"))
        }
        try:
            async with aiohttp.ClientSession() as http:  # no Authorization header at all
                body = {"model": "fast", "messages": _messages("hi")}
                async with http.post(f"{url}/chat/completions", json=body) as unkeyed:
                    assert unkeyed.status == WANTED_STATUS["unauthorized"]
                    assert (await unkeyed.json())["error"]["code"] == "unauthorized"
            with pytest.raises(openai.AuthenticationError):
                await clients["wrong"].chat.completions.create(
                    model="fast", messages=_messages("hi")
                )
            with pytest.raises(openai.AuthenticationError):
                await clients["wrong"].models.list()
            with pytest.raises(openai.AuthenticationError):  # the key decides, not the header
                await clients["right"].chat.completions.create(
                    model="fast",
                    messages=_messages("hi"),
                    extra_headers={"X-Quotaflow-Tenant": CAPPED_TENANT},
                )
            rid, prompt = f"fd-{uuid.uuid4().hex}", "Keyed hello"
            resp = await clients["right"].chat.completions.create(
                model="fast", messages=_messages(prompt), extra_headers={"X-Request-Id": rid}
            )
            assert resp.choices[0].message.content == _expected(stack, prompt, None)
            assert (await _usage_of(stack, rid)).tenant == tenant
        finally:
            for client in clients.values():
                await client.close()
    assert os.environ[key_env].encode() not in (home / "serve.log").read_bytes()
