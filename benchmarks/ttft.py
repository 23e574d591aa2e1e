"""Time to first token: through the gateway vs straight to the upstream, with the Kafka floor.

One run starts a local broker, the simulator (`quotaflow sim`, its own process) and the
gateway (`quotaflow run`, its own process, Ray started by it), then measures at low load,
sequentially and at a fixed open-loop rate:

* **kafka hop**: one produce -> consume through the same broker (an idempotent aiokafka
  producer with `linger_ms=0`, as the client's; a consumer already assigned and positioned
  at the end of a dedicated one-partition topic);
* **direct TTFT**: `openai.AsyncOpenAI(max_retries=0)` streaming from the simulator, time
  from the call to the first chunk carrying content;
* **gateway TTFT**: `QuotaflowClient.send` to the first `chunk` reply carrying content;
* **litellm TTFT** (the peer): `litellm.Router.acompletion(stream=True)` in this process
  over the same two deployments (same simulator, same keys), `num_retries=0`, no logging
  callbacks; call to the first chunk carrying content. Skipped, with the reason in the
  results, when litellm cannot be imported or set up (`--no-litellm` skips it too).

A request crosses Kafka twice (request in, reply out), so 2x a hop is the physical floor
of the gateway's overhead (gateway TTFT - direct TTFT). Every gateway sample also records
`done.timing.ttft_ms` (ingest -> first chunk handed to the producer, measured inside the
gateway), which splits the end-to-end time into "inside the gateway" and "outside it"
(Kafka legs, the client, the ingress poll).

    .venv/bin/python -m benchmarks.ttft [--n 200] [--warmup 20] [--rate 50] [--no-litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import openai
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks._common import (
    REPO,
    add_row,
    bench_work,
    machine,
    machine_summary,
    percentiles,
    publish,
    start_simulator,
    stop_proc,
    wait_line,
)
from benchmarks._litellm import LiteLLMPeer, litellm_version
from pipeline.client import QuotaflowClient
from pipeline.kafka_local import LocalKafka, free_port
from pipeline.stack import GatewayProcess, sim_config_dict, write_config
from topics.config import Config
from topics.wire import ChunkReply, DoneReply, ErrorReply

__all__ = ["Params", "format_table", "main", "run"]

NAME = "ttft"
FLOOR_TOPIC = "bench.kafka-floor"
PROMPT = "Benchmark: say something short."
# Limits far above what the benchmark sends: nothing may wait for quota.
LIMITS = {"rpm": 100_000, "tpm": 100_000_000}

_T = TypeVar("_T")


@dataclass(frozen=True)
class Params:
    n: int = 200
    warmup: int = 20
    rate: float = 50.0
    max_tokens: int = 16
    sim_ttft_ms: int = 20
    sim_inter_token_ms: int = 1
    litellm: bool = True
    litellm_streaming_logging: bool = False
    keep: bool = False
    record: bool = True


@dataclass
class Sample:
    """One upstream request, direct or through the gateway."""

    id: str  # sent as X-Client-Request-Id: the simulator's log has it
    sent_ms: float  # epoch ms when the call started (joins with the simulator's log)
    ttft_ms: float
    # Through the gateway: done.timing.ttft_ms, ingest -> first chunk handed to its producer.
    internal_ms: float | None = None
    # Epoch ms the simulator started handling the call (from its log, 1 ms resolution).
    upstream_at_ms: float | None = None

    @property
    def to_upstream_ms(self) -> float | None:
        return None if self.upstream_at_ms is None else self.upstream_at_ms - self.sent_ms

    @property
    def from_upstream_ms(self) -> float | None:
        to = self.to_upstream_ms
        return None if to is None else self.ttft_ms - to


@dataclass
class LoadResult:
    kafka_hop: list[float] = field(default_factory=list)
    direct: list[Sample] = field(default_factory=list)
    gateway: list[Sample] = field(default_factory=list)
    litellm: list[Sample] = field(default_factory=list)
    max_start_lag_ms: float = 0.0


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


# -- the three probes -------------------------------------------------------------------


class KafkaFloor:
    """Produce -> consume round trip on a dedicated topic through the same broker."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[bytes, asyncio.Future[None]] = {}
        self._run = uuid.uuid4().hex[:8]

    async def start(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="bench-admin")
        await admin.start()
        try:
            if FLOOR_TOPIC not in set(await admin.list_topics()):
                await admin.create_topics([NewTopic(FLOOR_TOPIC, 1, 1)])
        finally:
            await admin.close()
        # As the client's producer: idempotent (so acks=all), no linger.
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id="bench-floor",
            enable_idempotence=True,
            linger_ms=0,
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id="bench-floor",
            group_id=None,
            enable_auto_commit=False,
        )
        await self._consumer.start()
        partitions: set[int] = set()
        for _ in range(150):  # a fresh topic takes a moment to show in metadata
            partitions = set(await self._producer.partitions_for(FLOOR_TOPIC))
            if partitions:
                break
            await asyncio.sleep(0.1)
        tps = [TopicPartition(FLOOR_TOPIC, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for rec in records:
                    fut = self._waiting.pop(rec.value or b"", None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)

    async def once(self, i: int) -> float:
        assert self._producer is not None
        key = f"{self._run}-{i}".encode()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        t0 = time.perf_counter()
        ack = await self._producer.send(FLOOR_TOPIC, value=key)
        await asyncio.wait_for(fut, 30)
        hop = _ms(t0)
        await ack
        return hop

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()


class Direct:
    """Streaming Chat Completions straight to the simulator, as the gateway's callers do."""

    def __init__(self, config: Config, max_tokens: int) -> None:
        dep = config.deployments[0]
        self.model = dep.model
        self.max_tokens = max_tokens
        self.client = openai.AsyncOpenAI(
            base_url=dep.base_url, api_key=os.environ[dep.api_key_env], max_retries=0
        )

    async def once(self, i: int) -> Sample:
        rid = f"direct-{uuid.uuid4().hex}"
        ttft: float | None = None
        sent_ms = time.time() * 1000.0
        t0 = time.perf_counter()
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=self.max_tokens,
            stream=True,
            extra_headers={"X-Client-Request-Id": rid},
        )
        async for chunk in stream:  # read to the end so the connection is reused
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = _ms(t0)
        if ttft is None:
            raise RuntimeError("direct: the stream carried no content")
        return Sample(rid, sent_ms, ttft)

    async def close(self) -> None:
        await self.client.close()


class ViaGateway:
    """`QuotaflowClient.send` to the first content chunk, then on to the terminal reply."""

    def __init__(
        self, client: QuotaflowClient, max_tokens: int, exited: Callable[[], int | None]
    ) -> None:
        self.client = client
        self._exited = exited
        self.body = {
            "model": "fast",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "stream": True,
        }

    async def once(self, i: int) -> Sample:
        request = self.client.build(self.body)
        ttft: float | None = None
        internal: float | None = None
        sent_ms = time.time() * 1000.0
        t0 = time.perf_counter()
        await self.client.send(request)
        try:
            async for reply in self.client.replies(request.id, timeout_s=30):
                if isinstance(reply, ChunkReply):
                    if ttft is None and any(
                        (c.get("delta") or {}).get("content")
                        for c in reply.chunk.get("choices") or []
                    ):
                        ttft = _ms(t0)
                elif isinstance(reply, DoneReply):
                    internal = reply.timing.ttft_ms
                elif isinstance(reply, ErrorReply):
                    raise RuntimeError(f"gateway answered an error: {reply.error}")
        except TimeoutError:
            code = self._exited()
            if code is not None:
                raise RuntimeError(f"the gateway process exited (code {code}) mid-run") from None
            raise RuntimeError(f"no reply from the gateway in 30 s for {request.id}") from None
        if ttft is None:
            raise RuntimeError("gateway: no chunk carried content")
        return Sample(request.id, sent_ms, ttft, internal_ms=internal)


class ViaLiteLLM:
    """The peer: `litellm.Router` streaming from the same deployments, in this process."""

    def __init__(self, peer: LiteLLMPeer) -> None:
        self.peer = peer

    async def once(self, i: int) -> Sample:
        rid = f"litellm-{uuid.uuid4().hex}"
        sent_ms = time.time() * 1000.0
        t0 = time.perf_counter()
        first, _ = await self.peer.call(PROMPT, rid)
        return Sample(rid, sent_ms, (first - t0) * 1000.0)


# -- load shapes --------------------------------------------------------------------------


async def _open_loop(
    fn: Callable[[int], Awaitable[_T]], count: int, rate: float
) -> tuple[list[_T], float]:
    """Start `fn(i)` at `rate` per second whatever the answers do; results and the worst
    lateness of a start (ms) against its schedule."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    tasks: list[asyncio.Task[_T]] = []
    lag = 0.0
    for i in range(count):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lag = max(lag, (loop.time() - due) * 1000.0)
        tasks.append(asyncio.ensure_future(fn(i)))
    return list(await asyncio.gather(*tasks)), lag


async def _sequential(
    floor: KafkaFloor,
    direct: Direct,
    gateway: ViaGateway,
    litellm: ViaLiteLLM | None,
    p: Params,
) -> LoadResult:
    """One of each per round, interleaved, so slow drifts hit the series alike."""
    out = LoadResult()
    for i in range(p.warmup + p.n):
        hop = await floor.once(i)
        d = await direct.once(i)
        g = await gateway.once(i)
        lit = await litellm.once(i) if litellm is not None else None
        if i >= p.warmup:
            out.kafka_hop.append(hop)
            out.direct.append(d)
            out.gateway.append(g)
            if lit is not None:
                out.litellm.append(lit)
    return out


async def _at_rate(
    floor: KafkaFloor,
    direct: Direct,
    gateway: ViaGateway,
    litellm: ViaLiteLLM | None,
    p: Params,
) -> LoadResult:
    """Each series alone at `p.rate` req/s, open loop."""
    out = LoadResult()
    count = p.warmup + p.n
    base = 1_000_000  # floor message keys distinct from the sequential phase's
    hops, lag1 = await _open_loop(lambda i: floor.once(base + i), count, p.rate)
    directs, lag2 = await _open_loop(direct.once, count, p.rate)
    gws, lag3 = await _open_loop(gateway.once, count, p.rate)
    lag4 = 0.0
    if litellm is not None:
        lits, lag4 = await _open_loop(litellm.once, count, p.rate)
        out.litellm = lits[p.warmup :]
    out.kafka_hop = hops[p.warmup :]
    out.direct = directs[p.warmup :]
    out.gateway = gws[p.warmup :]
    out.max_start_lag_ms = round(max(lag1, lag2, lag3, lag4), 3)
    return out


# -- the stack ----------------------------------------------------------------------------


async def _measure(p: Params, work: Path, notes: dict[str, Any]) -> dict[str, LoadResult]:
    kafka = LocalKafka(home=work / "home")
    sim_proc: subprocess.Popen[bytes] | None = None
    gateway: GatewayProcess | None = None
    try:
        t = time.perf_counter()
        bootstrap = await asyncio.to_thread(kafka.up, 0)
        notes["kafka_up_s"] = round(time.perf_counter() - t, 1)
        raw = sim_config_dict(
            bootstrap=bootstrap,
            sim_port=free_port(),
            sim_log=work / "sim.jsonl",
            limits=LIMITS,
            sim={
                "ttft_ms": p.sim_ttft_ms,
                "inter_token_ms": p.sim_inter_token_ms,
                "output_tokens": p.max_tokens,
            },
        )
        config_path = work / "quotaflow.yaml"
        config = write_config(raw, config_path)
        sim_log = work / "sim.out"
        sim_proc = start_simulator(config_path, sim_log)
        line = await asyncio.to_thread(
            wait_line, sim_log, b"simulator listening on", sim_proc, 60.0
        )
        notes["simulator"] = line
        t = time.perf_counter()
        gateway = GatewayProcess(config_path, work / "gateway.log")
        await gateway.start()
        assert gateway.proc is not None
        notes["gateway_pid"] = gateway.proc.pid
        notes["gateway_start_s"] = round(time.perf_counter() - t, 1)

        peer: ViaLiteLLM | None = None
        if p.litellm:
            try:
                router = LiteLLMPeer(
                    config, "fast", p.max_tokens, streaming_logging=p.litellm_streaming_logging
                )
                notes["litellm"] = router.settings()
                peer = ViaLiteLLM(router)
            except Exception as exc:  # noqa: BLE001 - reported; the other series still run
                notes["litellm"] = {
                    "version": litellm_version(),
                    "missing_because": f"{type(exc).__name__}: {exc}",
                }
                print(f"litellm series skipped: {notes['litellm']['missing_because']}")
        else:
            notes["litellm"] = {"missing_because": "--no-litellm"}
        floor = KafkaFloor(bootstrap)
        direct = Direct(config, p.max_tokens)
        client = QuotaflowClient(bootstrap, client_id="bench-ttft")
        gw_proc = gateway.proc
        await floor.start()
        try:
            await client.start()
            via = ViaGateway(client, p.max_tokens, gw_proc.poll)
            t = time.perf_counter()
            seq = await _sequential(floor, direct, via, peer, p)
            notes["sequential_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            rated = await _at_rate(floor, direct, via, peer, p)
            notes["rate_s"] = round(time.perf_counter() - t, 1)
        finally:
            await client.stop()
            await direct.close()
            await floor.stop()
        results = {"sequential": seq, f"rate_{p.rate:g}": rated}
        _join_simulator_log(work / "sim.jsonl", results)
        return results
    finally:
        if gateway is not None:
            notes["gateway_exit"] = await gateway.stop()
        if sim_proc is not None:
            await asyncio.to_thread(stop_proc, sim_proc)
        await asyncio.to_thread(kafka.down)


def _join_simulator_log(path: Path, results: dict[str, LoadResult]) -> None:
    """Fill `upstream_at_ms` of every sample from the simulator's JSONL request log."""
    arrived: dict[str, float] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        rid = rec.get("client_request_id")
        if rid and rec.get("duration_ms") is not None:
            arrived[rid] = float(rec["ts_ms"]) - float(rec["duration_ms"])
    for res in results.values():
        for s in (*res.direct, *res.gateway, *res.litellm):
            s.upstream_at_ms = arrived.get(s.id)


def _present(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _summarise(res: LoadResult) -> dict[str, Any]:
    hop = percentiles(res.kafka_hop)
    direct = percentiles([s.ttft_ms for s in res.direct])
    gw = percentiles([s.ttft_ms for s in res.gateway])
    internal_samples = _present([s.internal_ms for s in res.gateway])
    outside = [s.ttft_ms - s.internal_ms for s in res.gateway if s.internal_ms is not None]
    internal = percentiles(internal_samples)
    d_to = percentiles(_present([s.to_upstream_ms for s in res.direct]))
    d_from = percentiles(_present([s.from_upstream_ms for s in res.direct]))
    g_to = percentiles(_present([s.to_upstream_ms for s in res.gateway]))
    g_from = percentiles(_present([s.from_upstream_ms for s in res.gateway]))
    over = {q: round(gw[q] - direct[q], 3) for q in ("p50", "p90", "p99")}
    lit = percentiles([s.ttft_ms for s in res.litellm])
    lit_over = {q: round(lit[q] - direct[q], 3) for q in ("p50", "p90", "p99") if q in lit}
    l_to = percentiles(_present([s.to_upstream_ms for s in res.litellm]))
    l_from = percentiles(_present([s.from_upstream_ms for s in res.litellm]))
    return {
        "kafka_hop_ms": hop,
        "direct_ttft_ms": direct,
        "gateway_ttft_ms": gw,
        # Breakdown of the gateway TTFT (done.timing.ttft_ms is the gateway's own clock).
        "gateway_inside_ms": internal,
        "gateway_outside_ms": percentiles(outside),
        "gateway_inside_minus_direct_ms": {
            q: round(internal[q] - direct[q], 3) for q in ("p50", "p99")
        },
        # Split at the simulator's arrival time (its log; 1 ms resolution): call start ->
        # upstream starts handling it, and upstream start -> first content token at the caller.
        "direct_to_upstream_ms": d_to,
        "direct_from_upstream_ms": d_from,
        "gateway_to_upstream_ms": g_to,
        "gateway_from_upstream_ms": g_from,
        "overhead_request_side_ms": {
            q: round(g_to[q] - d_to[q], 3) for q in ("p50", "p99") if q in g_to and q in d_to
        },
        "overhead_reply_side_ms": {
            q: round(g_from[q] - d_from[q], 3)
            for q in ("p50", "p99")
            if q in g_from and q in d_from
        },
        # Differences of percentiles (the series are not paired sample by sample).
        "overhead_ms": over,
        "overhead_over_hop": {q: round(over[q] / hop[q], 2) for q in ("p50", "p99") if hop.get(q)},
        "overhead_over_two_hops": {
            q: round(over[q] / (2 * hop[q]), 2) for q in ("p50", "p99") if hop.get(q)
        },
        # The peer, litellm.Router in this process (absent: n 0, no overhead keys).
        "litellm_ttft_ms": lit,
        "litellm_to_upstream_ms": l_to,
        "litellm_from_upstream_ms": l_from,
        "litellm_overhead_ms": lit_over,
        "litellm_overhead_over_hop": {
            q: round(lit_over[q] / hop[q], 2)
            for q in ("p50", "p99")
            if hop.get(q) and q in lit_over
        },
        "max_start_lag_ms": res.max_start_lag_ms,
        "samples": {
            "kafka_hop_ms": [round(x, 3) for x in res.kafka_hop],
            "direct_ttft_ms": [round(s.ttft_ms, 3) for s in res.direct],
            "gateway_ttft_ms": [round(s.ttft_ms, 3) for s in res.gateway],
            "litellm_ttft_ms": [round(s.ttft_ms, 3) for s in res.litellm],
            "gateway_inside_ms": [round(x, 3) for x in internal_samples],
            "direct_to_upstream_ms": _rounded([s.to_upstream_ms for s in res.direct]),
            "gateway_to_upstream_ms": _rounded([s.to_upstream_ms for s in res.gateway]),
        },
    }


def _rounded(values: Sequence[float | None]) -> list[float | None]:
    return [None if v is None else round(v, 3) for v in values]


async def run(p: Params) -> dict[str, Any]:
    """The whole benchmark; returns what goes to the results JSON."""
    started = datetime.now()
    t0 = time.perf_counter()
    with bench_work("ttft", keep=p.keep) as (work, notes, left):
        raw = await _measure(p, work, notes)
    return {
        "benchmark": NAME,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "machine": {**machine(), "litellm": litellm_version()},
        "params": {
            "n": p.n,
            "warmup": p.warmup,
            "rate_per_s": p.rate,
            "max_tokens": p.max_tokens,
            "sim_ttft_ms": p.sim_ttft_ms,
            "sim_inter_token_ms": p.sim_inter_token_ms,
            "litellm": p.litellm,
            "litellm_streaming_logging": p.litellm_streaming_logging,
            "limits": LIMITS,
            "prompt": PROMPT,
        },
        "notes": notes,
        "leftover_processes": left,
        "series": {load: _summarise(res) for load, res in raw.items()},
    }


# -- reporting ----------------------------------------------------------------------------

_TABLE_ROWS = (
    ("kafka hop", "kafka_hop_ms"),
    ("direct TTFT", "direct_ttft_ms"),
    ("  send->upstream", "direct_to_upstream_ms"),
    ("  upstream->token", "direct_from_upstream_ms"),
    ("gateway TTFT", "gateway_ttft_ms"),
    ("  send->upstream", "gateway_to_upstream_ms"),
    ("  upstream->token", "gateway_from_upstream_ms"),
    ("  inside gateway", "gateway_inside_ms"),
    ("  outside gateway", "gateway_outside_ms"),
    ("litellm TTFT", "litellm_ttft_ms"),
    ("  send->upstream", "litellm_to_upstream_ms"),
    ("  upstream->token", "litellm_from_upstream_ms"),
)


def format_table(result: dict[str, Any]) -> str:
    head = f"{'ttft (ms)':<20}{'load':<12}{'n':>5}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}"
    lines = [head, "-" * len(head)]
    for load, s in result["series"].items():
        for label, key in _TABLE_ROWS:
            q = s[key]
            if not q.get("n"):
                continue
            lines.append(
                f"{label:<20}{load:<12}{q['n']:>5}{q['p50']:>9.2f}{q['p90']:>9.2f}"
                f"{q['p99']:>9.2f}{q['max']:>9.2f}"
            )
        o, r = s["overhead_ms"], s["overhead_over_hop"]
        lines.append(
            f"{'overhead gw-direct':<20}{load:<12}{'':>5}{o['p50']:>9.2f}{o['p90']:>9.2f}"
            f"{o['p99']:>9.2f}"
        )
        for label, key in (
            ("  request side", "overhead_request_side_ms"),
            ("  reply side", "overhead_reply_side_ms"),
        ):
            part = s[key]
            if part:
                lines.append(
                    f"{label:<20}{load:<12}{'':>5}{part['p50']:>9.2f}{'':>9}{part['p99']:>9.2f}"
                )
        lines.append(
            f"{'overhead / hop':<20}{load:<12}{'':>5}{r.get('p50', 0):>9.2f}{'':>9}"
            f"{r.get('p99', 0):>9.2f}"
        )
        lo, lr = s["litellm_overhead_ms"], s["litellm_overhead_over_hop"]
        if lo:
            lines.append(
                f"{'litellm ovh -direct':<20}{load:<12}{'':>5}{lo['p50']:>9.2f}{lo['p90']:>9.2f}"
                f"{lo['p99']:>9.2f}"
            )
            lines.append(
                f"{'litellm ovh / hop':<20}{load:<12}{'':>5}{lr.get('p50', 0):>9.2f}{'':>9}"
                f"{lr.get('p99', 0):>9.2f}"
            )
        lines.append("")
    lit = result["notes"].get("litellm", {})
    if "missing_because" in lit:
        lines.append(f"litellm: not measured ({lit['missing_because']})")
    lines.append(f"took {result['duration_s']} s; {machine_summary(result['machine'])}")
    return "\n".join(lines)


_MD_SECTION = "ttft: time to first token, gateway vs direct, with the Kafka floor"
_MD_INTRO = """\
Simulator upstream with `ttft_ms` 20 and `inter_token_ms` 1 (unless the JSON says
otherwise), limits far above the load. Per load, after a warm-up: **kafka hop** is one
produce -> consume through the same broker; **direct** is the time to the first content
chunk calling the simulator with the openai SDK; **gateway** is `QuotaflowClient.send` to
the first content `chunk` reply, through `quotaflow run`; **litellm** (the peer) is
`litellm.Router.acompletion(stream=True)` in the benchmark's process over the same two
deployments, `num_retries=0`, no logging callbacks (version in the JSON). **overhead** =
gateway - direct, **litellm ovh** = litellm - direct (differences of the percentiles); a
request crosses Kafka twice, so **ovh/hop** of 2 would be the gateway's physical floor.
`sequential`: one request of each kind at a time, interleaved; `rate_R`: each series alone
at R req/s, open loop. p99 of N=200 rests on ~2 samples. **loadavg** (1 min) at start and
end: everything shares the machine's cores, so a rise means something else ran too, and
the tails then say more about it than about us."""
_MD_COLUMNS = (
    "date",
    "machine",
    "bench",
    "load",
    "N",
    "kafka hop p50/p99",
    "direct p50/p99",
    "gateway p50/p99",
    "overhead p50/p99",
    "ovh/hop p50",
    "ovh/hop p99",
    "litellm p50/p99",
    "litellm ovh p50/p99",
    "litellm ovh/hop p50 / p99",
    "loadavg start -> end",
    "results",
)


def _pair(q: dict[str, float]) -> str:
    return f"{q['p50']:.2f} / {q['p99']:.2f}" if "p50" in q else "-"


def _ratio_pair(r: dict[str, float]) -> str:
    return f"{r['p50']:.1f} / {r['p99']:.1f}" if "p50" in r and "p99" in r else "-"


def record(result: dict[str, Any], json_path: Path) -> Path:
    """One BENCHMARKS.md row per load of this run."""
    date = result["started_at"].replace("T", " ")[:16]
    summary = machine_summary(result["machine"])
    notes = result["notes"]
    loadavg = f"{notes['loadavg_at_start'][0]:.1f} -> {notes['loadavg_at_end'][0]:.1f}"
    path = json_path
    for load, s in result["series"].items():
        ratio = s["overhead_over_hop"]
        path = add_row(
            _MD_SECTION,
            _MD_INTRO,
            _MD_COLUMNS,
            [
                date,
                summary,
                result["benchmark"],
                load,
                str(s["gateway_ttft_ms"]["n"]),
                _pair(s["kafka_hop_ms"]),
                _pair(s["direct_ttft_ms"]),
                _pair(s["gateway_ttft_ms"]),
                _pair(s["overhead_ms"]),
                f"{ratio.get('p50', float('nan')):.1f}",
                f"{ratio.get('p99', float('nan')):.1f}",
                _pair(s["litellm_ttft_ms"]),
                _pair(s["litellm_overhead_ms"]),
                _ratio_pair(s["litellm_overhead_over_hop"]),
                loadavg,
                f"`{json_path.relative_to(REPO)}`",
            ],
        )
    return path


def parse_args(argv: Sequence[str] | None = None) -> Params:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ttft", description=__doc__)
    ap.add_argument("--n", type=int, default=200, help="samples per series after warm-up")
    ap.add_argument("--warmup", type=int, default=20, help="samples dropped per series")
    ap.add_argument("--rate", type=float, default=50.0, help="open-loop rate, req/s")
    ap.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM peer series")
    ap.add_argument(
        "--litellm-streaming-logging",
        action="store_true",
        help="keep litellm's per-chunk success logging (off by default: no callback reads it)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, broker data)")
    ap.add_argument("--no-record", action="store_true", help="write neither JSON nor BENCHMARKS.md")
    a = ap.parse_args(argv)
    if a.n < 1 or a.warmup < 0 or a.rate <= 0:
        ap.error("--n must be >= 1, --warmup >= 0, --rate > 0")
    return Params(
        n=a.n,
        warmup=a.warmup,
        rate=a.rate,
        litellm=not a.no_litellm,
        litellm_streaming_logging=a.litellm_streaming_logging,
        keep=a.keep,
        record=not a.no_record,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parse_args(argv)
    result = asyncio.run(run(p))
    publish(NAME, result, format_table(result), record if p.record else None)
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
