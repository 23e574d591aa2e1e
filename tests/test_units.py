"""Pure logic without Kafka or Ray: config, validation, offsets, cache, routing, logging."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import structlog
from structlog.testing import LogCapture

from actors._exact_cache import ExactCache, cache_key, cacheable
from actors._messages import CacheEntry, RouteAsk
from actors._routing import Router
from pipeline._offsets import OffsetTracker
from pipeline._validate import parse_request, salvage
from topics.config import CacheConfig, Config, parse_config
from topics.errors import ConfigError, InvalidRequest
from topics.logs import REDACTED, redact
from topics.specs import REPLY_DECODER, REPLY_ENCODER, topic_specs
from topics.wire import ChunkReply, DoneReply, Request, Timing, TokenUsage

BASE: dict[str, Any] = {
    "deployments": [
        {"name": "a", "base_url": "http://127.0.0.1:1/v1", "api_key_env": "KA", "model": "m"},
        {"name": "b", "base_url": "http://127.0.0.1:1/v1", "api_key_env": "KB", "model": "m"},
    ],
    "models": [
        {"name": "fast", "deployments": ["a", "b"], "aliases": ["small"]},
        {"name": "big", "deployments": ["b"]},
    ],
}


# -- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"bogus": 1}, "key path bogus, value 1"),
        ({"gateway": {"max_in_flight": 0}}, "key path gateway.max_in_flight, value 0"),
        ({"kafka": {"linger": 5}}, "key path kafka.linger"),
        ({"models": [{"name": "x", "deployments": ["zzz"]}]}, "unknown deployment 'zzz'"),
        ({"models": [{"name": "auto", "deployments": ["a"]}]}, "'auto' is reserved"),
    ],
)
def test_config_errors_name_key_and_value(patch: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace(".", r"\.")):
        parse_config({**BASE, **patch})


def test_config_error_for_bad_limit_names_the_path() -> None:
    raw = json.loads(json.dumps(BASE))
    raw["deployments"][1]["limits"] = {"rpm": -5}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert "deployments[1].limits.rpm" in str(info.value)
    assert "-5" in str(info.value)


def test_internal_topics_are_compacted() -> None:
    specs = {s.name: s for s in topic_specs(parse_config(BASE))}
    assert specs["llm.requests"].cleanup_policy == "delete"
    assert specs["quotaflow.cache"].cleanup_policy == "compact"
    assert all(
        s.cleanup_policy == "compact" for n, s in specs.items() if n.startswith("quotaflow.")
    )


# -- request validation ------------------------------------------------------------------

GOOD = {"id": "r1", "request": {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}}


@pytest.mark.parametrize(
    ("patch", "field", "value"),
    [
        ({"priority": 12}, "priority", None),
        ({"tier": "gold"}, "tier", None),
        ({"id": ""}, "id", None),
        ({"request": {"messages": [{"role": "user", "content": "x"}]}}, "request.model", "None"),
        ({"request": {"model": "fast", "messages": "hi"}}, "request.messages", "'hi'"),
        (
            {"request": {"model": "fast", "messages": [{"role": "user", "content": 5}]}},
            "request.messages[0].content",
            "5",
        ),
        (
            {
                "request": {
                    "model": "fast",
                    "max_tokens": -1,
                    "messages": [{"role": "user", "content": "x"}],
                }
            },
            "request.max_tokens",
            "-1",
        ),
    ],
)
def test_invalid_requests_name_field_and_value(
    patch: dict[str, Any], field: str, value: str | None
) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(json.dumps({**GOOD, **patch}).encode())
    assert info.value.message.startswith(field), info.value.message
    if value is not None:
        assert value in info.value.message


def test_salvage_reads_id_and_reply_to_from_broken_requests() -> None:
    broken = json.dumps({"id": "x1", "reply_to": "my.replies", "request": 5}).encode()
    found = salvage(broken)
    assert found is not None
    assert (found.id, found.reply_to) == ("x1", "my.replies")
    assert salvage(b"{nope") is None
    assert salvage(json.dumps({"id": "x", "reply_to": "bad topic!"}).encode()) is None


def test_reply_union_round_trips_with_type_tag() -> None:
    done = DoneReply(
        id="r",
        seq=3,
        finish_reason="stop",
        usage=TokenUsage(),
        model="fast",
        deployment="a",
        timing=Timing(),
    )
    wire = json.loads(REPLY_ENCODER.encode(done))
    assert wire["type"] == "done"
    assert isinstance(REPLY_DECODER.decode(REPLY_ENCODER.encode(done)), DoneReply)
    chunk = ChunkReply(id="r", seq=0, chunk={"object": "chat.completion.chunk"})
    assert json.loads(REPLY_ENCODER.encode(chunk))["type"] == "chunk"


# -- offsets ---------------------------------------------------------------------------


def test_offsets_commit_only_behind_the_oldest_unanswered() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    for off in (10, 11, 12):
        t.add("p0", off)
    t.done("p0", 11)
    assert t.committable() == {"p0": 10}
    t.mark_committed({"p0": 10})
    assert t.committable() == {}
    t.done("p0", 10)
    assert t.committable() == {"p0": 12}
    t.done("p0", 12)
    assert t.committable() == {"p0": 13}
    t.forget("p0")
    assert t.committable() == {}


# -- exact cache -------------------------------------------------------------------------


def _req(**body: Any) -> Request:
    return msgspec.convert(
        {
            "id": "r",
            "request": {"model": "fast", "messages": [{"role": "user", "content": "q"}], **body},
        },
        Request,
    )


def test_cache_key_ignores_transport_fields_and_sees_answer_fields() -> None:
    base = cache_key(_req(temperature=0), "fast")
    assert cache_key(_req(temperature=0, stream=True, user="u"), "fast") == base
    assert cache_key(_req(temperature=0, max_tokens=5), "fast") != base
    assert cache_key(_req(temperature=0), "big") != base
    other_tenant = msgspec.structs.replace(_req(temperature=0), tenant="other")
    assert cache_key(other_tenant, "fast") != base


def test_only_deterministic_requests_are_cacheable() -> None:
    cfg = CacheConfig()
    assert cacheable(_req(temperature=0), cfg)
    assert not cacheable(_req(), cfg)  # OpenAI's default temperature is 1
    assert not cacheable(_req(temperature=0.7), cfg)
    assert not cacheable(msgspec.structs.replace(_req(temperature=0), cache="bypass"), cfg)


def _entry(key: str, text: str = "x", at: float = 0.0) -> CacheEntry:
    return CacheEntry(
        key=key,
        text=text,
        finish_reason="stop",
        prompt_tokens=1,
        completion_tokens=1,
        upstream_model="m",
        model="fast",
        stored_at=at,
    )


def test_cache_evicts_least_recently_used_and_expires_by_ttl() -> None:
    now = [0.0]
    cache = ExactCache(CacheConfig(max_entries=2, ttl_s=10), clock=lambda: now[0])
    cache.put(_entry("a"))
    cache.put(_entry("b"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put(_entry("c"))
    assert cache.get("b") is None
    assert cache.evictions == 1
    now[0] = 11.0
    assert cache.get("a") is None
    assert len(cache) == 1


def test_cache_bounds_bytes() -> None:
    cache = ExactCache(CacheConfig(max_bytes=1000))
    cache.put(_entry("a", "x" * 600))
    cache.put(_entry("b", "y" * 600))
    assert len(cache) == 1
    assert cache.bytes <= 1000


# -- routing -----------------------------------------------------------------------------


def test_router_resolves_aliases_auto_and_orders_by_headroom() -> None:
    router = Router(parse_config(BASE))
    r1, r2, r3 = router.route(
        [RouteAsk(1, "small", "t"), RouteAsk(2, "auto", "t"), RouteAsk(3, "x", "t")]
    )
    assert (r1.model, r1.candidates) == ("fast", ("a", "b"))
    assert r2.model == "fast"
    assert r3.error == "unknown_model"
    assert r3.message is not None
    assert "'x'" in r3.message
    router.update_headroom({"a": 0.1, "b": 0.9})
    assert router.route([RouteAsk(4, "fast", "t")])[0].candidates == ("b", "a")


# -- logging -----------------------------------------------------------------------------


def test_logs_redact_keys_and_authorization() -> None:
    cap = LogCapture()
    structlog.configure(processors=[redact, cap])
    try:
        log = structlog.get_logger().bind(request_id="r1", tenant="t1")
        log.info(
            "call",
            authorization="Bearer sk-live-abcdefghijkl",
            api_key="sk-live-abcdefghijkl",
            note="header was Bearer abc.def and key sk-proj-1234567890",
            headers={"Authorization": "Bearer zzz", "x": 1},
        )
    finally:
        structlog.reset_defaults()
    (event,) = cap.entries
    assert event["authorization"] == REDACTED
    assert event["api_key"] == REDACTED
    assert event["headers"] == {"Authorization": REDACTED, "x": 1}
    assert "abc.def" not in event["note"]
    assert "sk-proj-1234567890" not in event["note"]
    assert event["request_id"] == "r1"
    assert event["tenant"] == "t1"


def test_shipped_example_configs_are_valid() -> None:
    from pathlib import Path

    from topics.config import load_config

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        assert load_config(path).deployments


def test_prompt_counter_uses_a_real_tokenizer_and_never_undercuts_the_estimate() -> None:
    from topics.tokens import PromptCounter, estimate_prompt_tokens

    counter = PromptCounter(["gpt-4o", "sim-small"])
    assert counter.models_with_tokenizer == ["gpt-4o"]  # bpe-openai is in the dev extra
    english = [{"role": "user", "content": "Where is my parcel? I ordered it last week."}]
    cjk = [{"role": "user", "content": "我的包裹在哪里 我上周订购了它 但它还没有到 " * 4}]
    for messages in (english, cjk):
        assert counter.count(messages, ["gpt-4o"]) >= estimate_prompt_tokens(messages)
        assert counter.count(messages, ["sim-small"]) == estimate_prompt_tokens(messages)
    # Characters undercount Chinese text: the tokenizer raises the reservation.
    assert counter.count(cjk, ["gpt-4o"]) > estimate_prompt_tokens(cjk)


# -- upstream transport ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _http_server(path: str, handler: Any) -> AsyncIterator[int]:
    """A local aiohttp server answering `path` (any method) with `handler`; yields its port."""
    from aiohttp import web

    app = web.Application()
    app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def _one_deployment(base_url: str, transport: str) -> Config:
    raw = {**BASE, "deployments": [{**BASE["deployments"][0], "base_url": base_url}]}
    raw["models"] = [{"name": "fast", "deployments": ["a"]}]
    raw["gateway"] = {"upstream_transport": transport}
    return parse_config(raw)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_call_is_reported_sent_when_its_headers_are_written(
    monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """Either transport's trace names the request id of each call sent (what paced
    deployments report to the quota actor); a call without one reports nothing."""
    from aiohttp import web

    from actors._upstream import _REQUEST_ID_HEADER, Upstream

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    monkeypatch.setenv("KA", "sk-test-a")
    async with _http_server("/v1/models", models) as port:
        config = _one_deployment(f"http://127.0.0.1:{port}/v1", transport)
        sent: list[str] = []
        up = Upstream(config, on_send=sent.append)
        try:
            client = up.client(config.deployments[0])
            await client.models.list()
            await client.models.list(extra_headers={_REQUEST_ID_HEADER: "req-1"})
            assert sent == ["req-1"]
        finally:
            await up.close()


_PROXY_ENV = ("NO_PROXY", "ALL_PROXY", "HTTP_PROXY", "HTTPS_PROXY")


def _without_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variable of this machine's environment, upper or lower case, in the test."""
    for name in _PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_calls_go_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """HTTP_PROXY is honoured by either transport (httpx drops it once given a transport
    of its own, so the aiohttp session reads it itself); the upstream host here does not
    resolve, so only the proxy can answer."""
    from aiohttp import web

    from actors._upstream import Upstream

    seen: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        return web.json_response({"object": "list", "data": []})

    _without_proxy_env(monkeypatch)
    monkeypatch.setenv("KA", "sk-test-a")
    upstream = "http://upstream.invalid:8080/v1"
    config = _one_deployment(upstream, transport)
    async with _http_server("/{tail:.*}", proxy) as port:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        up = Upstream(config)
        try:
            await up.client(config.deployments[0]).models.list()
            assert seen == [f"{upstream}/models"]
        finally:
            await up.close()


async def test_the_environments_proxy_is_read_once_per_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`NO_PROXY` is honoured, and the session does not read the environment (nor
    `~/.netrc`) again per request: aiohttp does that on a thread, which cost the callers
    GIL hand-offs on every call."""
    import aiohttp

    from actors._upstream import _TracedTransport, env_proxy

    _without_proxy_env(monkeypatch)
    url = "http://upstream.invalid:8080/v1"
    assert env_proxy(url) == (None, None)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    proxy, _ = env_proxy(url)
    assert str(proxy) == "http://127.0.0.1:3128"
    monkeypatch.setenv("NO_PROXY", "upstream.invalid")
    assert env_proxy(url) == (None, None)
    monkeypatch.delenv("NO_PROXY")
    session = _TracedTransport(aiohttp.TraceConfig, url).get_client()
    try:
        assert session.trust_env is False
    finally:
        await session.close()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_netrc_entry_for_the_upstream_host_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, transport: str
) -> None:
    """The deployment's key is the only credential sent: with `trust_env` aiohttp took
    `~/.netrc` credentials for the host and then refused every call ("Cannot combine
    AUTHORIZATION header with AUTH argument")."""
    from aiohttp import web

    from actors._upstream import Upstream

    auth: list[str | None] = []

    async def models(request: web.Request) -> web.Response:
        auth.append(request.headers.get("Authorization"))
        return web.json_response({"object": "list", "data": []})

    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login someone password not-the-key\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("KA", "sk-test-a")
    async with _http_server("/v1/models", models) as port:
        config = _one_deployment(f"http://127.0.0.1:{port}/v1", transport)
        up = Upstream(config)
        try:
            await up.client(config.deployments[0]).models.list()
        finally:
            await up.close()
    assert auth == ["Bearer sk-test-a"]


def test_malloc_trim_runs_on_its_interval_and_one_loop_per_trimmer() -> None:
    import threading

    from actors._process import Trimmer

    calls: list[float] = []
    twice = threading.Event()

    def trim() -> None:
        calls.append(time.monotonic())
        if len(calls) >= 2:
            twice.set()

    stop = threading.Event()
    trimmer = Trimmer()  # its own, not the process's: earlier tests may have started that
    thread = trimmer.ensure(0.01, trim, stop=stop)
    assert thread is not None
    try:
        assert twice.wait(10.0), f"trim ran {len(calls)} times"
        assert trimmer.ensure(0.01, trim, stop=stop) is None  # one loop per trimmer
    finally:
        stop.set()
        thread.join(10.0)
    assert not thread.is_alive()
    # A loop that ended may be started again.
    again = threading.Event()
    restarted = trimmer.ensure(0.01, again.set, stop=(stop2 := threading.Event()))
    assert restarted is not None
    try:
        assert again.wait(10.0)
    finally:
        stop2.set()
        restarted.join(10.0)


def test_malloc_trim_keeps_going_after_a_failing_trim() -> None:
    import threading

    from actors._process import start_malloc_trim

    after = threading.Event()
    calls: list[int] = []

    def trim() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("trim failed")
        after.set()

    stop = threading.Event()
    thread = start_malloc_trim(0.01, trim, stop=stop)
    try:
        with structlog.testing.capture_logs() as logs:
            assert after.wait(10.0)
    finally:
        stop.set()
        thread.join(10.0)
    assert len(calls) >= 2
    assert [e["event"] for e in logs][:1] == ["malloc_trim_failed"]


def test_glibc_malloc_trim_is_callable_here() -> None:
    from actors._process import glibc_malloc_trim

    trim = glibc_malloc_trim()
    if trim is None:
        pytest.skip("no glibc malloc_trim on this system")
    assert trim() in (0, 1)
