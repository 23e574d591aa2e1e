"""Throughput on the cache-miss path: streamed requests at a fixed rate, then the knee.

One run starts a local broker, the simulator (`quotaflow sim`, its own process, 16 output
tokens, `ttft_ms` 20, `inter_token_ms` 1) and the gateway (`quotaflow run`, its own
process, Ray started by it), with limits far above the load so quota never binds, then:

1. **probes**: direct TTFT (`openai.AsyncOpenAI(max_retries=0)` straight to the
   simulator), sequentially and at a low open-loop rate, interleaved with the same through
   LiteLLM's Router (the peer): the floor the overheads are taken against;
2. **gateway knee**: after a warm-up, open-loop streamed requests (fresh ids, not
   cacheable: no temperature) in steps of increasing rate (`--steps`, `--step-s` each),
   each published with `QuotaflowClient.send` from its own task (so publishes overlap and
   the producer batches them), one client consumer on the reply topic; per request the
   time to the first content chunk (TTFT), to `done` (total), errors, and requests with no
   terminal reply in `--timeout` s (lost). The search stops at the first step that does
   not keep up: completion rate under `--keep-up` x the offered rate, p99 total over
   `--p99-bound-ms`, or more than `--max-failed` of the requests errored or lost; what it
   left queued is waited out (one request at a time until one is fast again);
3. **gateway at `--rate` for `--duration` s**: the same workload, the headline figure;
4. the gateway is stopped, and the same workload (2, 3) runs through `litellm.Router`
   in this process (`acompletion(stream=True)`, `num_retries=0`, no logging callbacks).
   A request the load generator could not even start within `--timeout` s of its due
   time (its loop starved, as an in-process peer can make it) counts as failed (`unsent`).

Overhead = TTFT percentile at load - direct TTFT percentile at the probe rate. Per step
the CPU used by each party (this load generator, the gateway with its Ray processes, the
simulator, the broker) is read from /proc, so a saturated load generator shows.

    .venv/bin/python -m benchmarks.throughput [--rate 500] [--duration 60] [--no-litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import openai

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

NAME = "throughput"
MODEL = "fast"  # the public model of sim_config_dict
PROMPT = "Benchmark: say something short."
# Limits far above what the benchmark sends: nothing may wait for quota.
LIMITS = {"rpm": 10_000_000, "tpm": 10_000_000_000}
# From well below the knee measured on 2 cores (the 100 req/s step already queued past
# its p99 bound there), so that a knee is found, up past the 500 req/s target.
DEFAULT_STEPS = (25.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 400.0, 500.0, 600.0, 800.0, 1000.0)
# Pause between phases so one phase's tail does not land in the next one's window.
SETTLE_S = 2.0


@dataclass(frozen=True)
class Params:
    rate: float = 500.0
    duration_s: float = 60.0
    steps: tuple[float, ...] = DEFAULT_STEPS
    step_s: float = 20.0
    keep_up: float = 0.95
    p99_bound_ms: float = 2000.0
    max_failed: float = 0.0
    timeout_s: float = 30.0
    probe_n: int = 100
    probe_rate: float = 10.0
    warmup_n: int = 50
    max_tokens: int = 16
    sim_ttft_ms: int = 20
    sim_inter_token_ms: int = 1
    litellm: bool = True
    litellm_streaming_logging: bool = False
    keep: bool = False
    record: bool = True
    # `gateway.<key>` settings of the gateway under test (A/B runs of one setting).
    gateway: tuple[tuple[str, Any], ...] = ()


@dataclass(slots=True)
class Rec:
    """One request as the load generator saw it (times: `perf_counter()` seconds)."""

    due: float  # when the schedule wanted it sent
    sent: float = 0.0
    published: float | None = None  # publish acknowledged (gateway only)
    first: float | None = None  # first content chunk
    done: float | None = None  # terminal success
    error: str | None = None
    detail: str | None = None  # the error's message, for the results' examples
    lost: bool = False
    cache: str | None = None


@dataclass
class Phase:
    """One open-loop load: its records and what each party's CPU did meanwhile."""

    series: str
    label: str
    rate: float
    seconds: float
    recs: list[Rec] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    loadavg: float = 0.0


Target = Callable[[Rec], Awaitable[None]]


def _now() -> float:
    return time.perf_counter()


# -- what a request goes through ----------------------------------------------------------


def _has_content(chunk: dict[str, Any]) -> bool:
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or [])


class ViaGateway:
    """Publish with `QuotaflowClient.send`, then read its replies to the terminal one."""

    def __init__(self, client: QuotaflowClient, max_tokens: int) -> None:
        self.client = client
        self.body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "stream": True,
        }

    async def __call__(self, rec: Rec) -> None:
        request = self.client.build(self.body)
        replies = self.client.replies(request.id)  # registered before the send
        rec.sent = _now()
        await self.client.send(request)
        rec.published = _now()
        async for reply in replies:
            if isinstance(reply, ChunkReply):
                if rec.first is None and _has_content(reply.chunk):
                    rec.first = _now()
            elif isinstance(reply, DoneReply):
                rec.done = _now()
                rec.cache = reply.cache
            elif isinstance(reply, ErrorReply):
                rec.error, rec.detail = reply.error.code, reply.error.message


class Direct:
    """Streaming Chat Completions straight to the simulator (a deployment of `fast`)."""

    def __init__(self, config: Config, max_tokens: int) -> None:
        dep = config.deployments[0]
        self.model = dep.model
        self.max_tokens = max_tokens
        self.client = openai.AsyncOpenAI(
            base_url=dep.base_url, api_key=os.environ[dep.api_key_env], max_retries=0
        )

    async def __call__(self, rec: Rec) -> None:
        rec.sent = _now()
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=self.max_tokens,
            stream=True,
            extra_headers={"X-Client-Request-Id": f"direct-{uuid.uuid4().hex}"},
        )
        async for chunk in stream:
            if rec.first is None and chunk.choices and chunk.choices[0].delta.content:
                rec.first = _now()
        rec.done = _now()

    async def close(self) -> None:
        await self.client.close()


class ViaLiteLLM:
    """The same request through `litellm.Router` in this process."""

    def __init__(self, peer: LiteLLMPeer) -> None:
        self.peer = peer

    async def __call__(self, rec: Rec) -> None:
        rec.sent = _now()
        rec.first, rec.done = await self.peer.call(PROMPT, f"litellm-{uuid.uuid4().hex}")


# -- CPU of each party --------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float, bytes]]:
    """pid -> (parent pid, CPU seconds used so far, command line), from /proc."""
    out: dict[int, tuple[int, float, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # from the state field on
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK, cmd)
    return out


def _descendants(root: int, table: dict[int, tuple[int, float, bytes]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


class CpuMeter:
    """CPU seconds used so far by this process and by each party the run started: the
    gateway with every process under it (Ray's), the simulator, the broker."""

    def __init__(self, work: Path) -> None:
        self.work = str(work).encode()
        self.roots: dict[str, int] = {}  # party -> pid of its top process

    def sample(self) -> dict[str, float]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out = {"load_generator": ru.ru_utime + ru.ru_stime}
        table = _proc_table()
        for party, root in self.roots.items():
            out[party] = sum(table[pid][1] for pid in _descendants(root, table))
        out["kafka"] = sum(
            cpu for _, cpu, cmd in table.values() if b"kafka.Kafka" in cmd and self.work in cmd
        )
        return out


# -- load ----------------------------------------------------------------------------------


async def _one(target: Target, rec: Rec, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await target(rec)
    except TimeoutError:
        rec.lost = True
    except Exception as exc:  # noqa: BLE001 - every failure is an outcome to count
        rec.error, rec.detail = type(exc).__name__, str(exc)[:300]
    if rec.done is None and rec.error is None and not rec.lost:
        rec.error = "no_terminal"


async def _open_loop(
    series: str, label: str, target: Target, rate: float, seconds: float, p: Params, cpu: CpuMeter
) -> Phase:
    """Start requests at `rate`/s for `seconds`, whatever the answers do; wait for all of
    them (each gives up after `p.timeout_s`)."""
    phase = Phase(series, label, rate, seconds)
    count = max(1, round(rate * seconds))
    before = cpu.sample()
    t0 = _now()
    start = t0 + 0.05
    tasks: list[asyncio.Task[None]] = []
    for i in range(count):
        due = start + i / rate
        delay = due - _now()
        if delay > 0:
            await asyncio.sleep(delay)
        rec = Rec(due=due)
        phase.recs.append(rec)
        if _now() - due > p.timeout_s:
            # The load generator itself is that far behind (its loop is starved): counted
            # as failed, so an overloaded peer cannot stretch a phase without bound.
            rec.error = "unsent"
            continue
        tasks.append(asyncio.ensure_future(_one(target, rec, p.timeout_s)))
    await asyncio.gather(*tasks)
    phase.wall_s = _now() - t0
    after = cpu.sample()
    phase.cpu_s = {k: round(after.get(k, 0.0) - before.get(k, 0.0), 2) for k in after}
    phase.loadavg = os.getloadavg()[0]
    return phase


async def _sequential(targets: dict[str, Target], n: int, p: Params) -> dict[str, Phase]:
    """`n` of each target, one request at a time, interleaved."""
    out = {name: Phase(name, "sequential", 0.0, 0.0) for name in targets}
    for _ in range(n):
        for name, target in targets.items():
            rec = Rec(due=_now())
            await _one(target, rec, p.timeout_s)
            out[name].recs.append(rec)
    return out


async def _drain(target: Target, bound_s: float, p: Params) -> float:
    """After a phase that fell behind, what it left queued (in the gateway) must clear
    before the next one: one request at a time until one is answered within `bound_s`,
    or `p.timeout_s` x 4 have passed. Returns the seconds it took."""
    t0 = _now()
    while _now() - t0 < 4 * p.timeout_s:
        rec = Rec(due=_now())
        await _one(target, rec, p.timeout_s)
        if rec.done is not None and rec.done - rec.sent <= bound_s:
            break
        await asyncio.sleep(SETTLE_S)
    return round(_now() - t0, 1)


async def _series(
    name: str, target: Target, p: Params, cpu: CpuMeter, log: Callable[[str], None]
) -> tuple[Phase, list[Phase], dict[str, float]]:
    """Warm-up, the knee steps until one fails, then the `p.rate` x `p.duration_s` run
    (after whatever the failed step left queued has cleared)."""
    warm = await _open_loop(name, "warmup", target, 50.0, p.warmup_n / 50.0, p, cpu)
    totals = [r.done - r.sent for r in warm.recs if r.done is not None]
    # "Cleared" = a lone request as fast as 2x the warm-up's median, at least 0.5 s.
    bound_s = max(0.5, 2 * sorted(totals)[len(totals) // 2]) if totals else 0.5
    drains: dict[str, float] = {}
    steps: list[Phase] = []
    for rate in p.steps:
        await asyncio.sleep(SETTLE_S)
        step = await _open_loop(name, f"step_{rate:g}", target, rate, p.step_s, p, cpu)
        steps.append(step)
        log(_step_line(step, p))
        if not _summary(step, p)["kept_up"]:
            drains[step.label] = await _drain(target, bound_s, p)
            break
    await asyncio.sleep(SETTLE_S)
    main_phase = await _open_loop(name, f"rate_{p.rate:g}", target, p.rate, p.duration_s, p, cpu)
    log(_step_line(main_phase, p))
    if not _summary(main_phase, p)["kept_up"]:
        drains[main_phase.label] = await _drain(target, bound_s, p)
    return main_phase, steps, drains


# -- summaries -----------------------------------------------------------------------------


def _ms(samples: Sequence[float]) -> list[float]:
    return [x * 1000.0 for x in samples]


def _summary(ph: Phase, p: Params) -> dict[str, Any]:
    recs = ph.recs
    ok = [r for r in recs if r.done is not None and r.error is None and not r.lost]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in recs:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
            if r.detail and r.error not in examples:
                examples[r.error] = r.detail
    lost = sum(r.lost for r in recs)
    first_sent = min((r.sent for r in recs if r.sent), default=0.0)
    last_sent = max((r.sent for r in recs if r.sent), default=0.0)
    done_at = [r.done for r in ok if r.done is not None]
    last_done = max(done_at, default=first_sent)
    span = last_done - first_sent
    completion_rate = len(ok) / span if span > 0 else 0.0
    # Between the first and the last `done`: the rate answers came at, without the one
    # request latency that (last done - first send) adds to a short window.
    done_span = last_done - min(done_at, default=last_done)
    steady_rate = (len(ok) - 1) / done_span if done_span > 0 else 0.0
    started = sum(1 for r in recs if r.sent)
    send_span = last_sent - first_sent
    send_rate = (started - 1) / send_span if send_span > 0 and started > 1 else 0.0
    published = [r.published for r in recs if r.published is not None]
    pub_span = max(published, default=0.0) - first_sent
    publish_rate = len(published) / pub_span if pub_span > 0 else None
    ttft = percentiles(_ms([r.first - r.sent for r in ok if r.first is not None]))
    total = percentiles(_ms([r.done - r.sent for r in ok if r.done is not None]))
    lag = percentiles(_ms([r.sent - r.due for r in recs if r.sent]))
    failed = len(recs) - len(ok)
    out: dict[str, Any] = {
        "series": ph.series,
        "load": ph.label,
        "offered_rate": ph.rate,
        "seconds": ph.seconds,
        "sent": len(recs),
        "completed": len(ok),
        "errors": errors,
        "error_examples": examples,
        "lost": lost,
        "send_rate": round(send_rate, 1),
        "publish_rate": None if publish_rate is None else round(publish_rate, 1),
        "completion_rate": round(completion_rate, 1),
        "steady_completion_rate": round(steady_rate, 1),
        "ttft_ms": ttft,
        "total_ms": total,
        "start_lag_ms": lag,
        "cache_not_miss": sum(r.cache not in (None, "miss") for r in ok),
        "wall_s": round(ph.wall_s, 1),
        "cpu_cores": {k: round(v / ph.wall_s, 2) for k, v in ph.cpu_s.items()} if ph.wall_s else {},
        "loadavg_1m": round(ph.loadavg, 2),
    }
    if ph.rate > 0:
        out["kept_up"] = bool(
            steady_rate >= p.keep_up * ph.rate
            and total.get("p99", float("inf")) <= p.p99_bound_ms
            and failed <= p.max_failed * len(recs)
        )
    return out


def _step_line(ph: Phase, p: Params) -> str:
    s = _summary(ph, p)
    errs = sum(s["errors"].values())
    t, tot = s["ttft_ms"], s["total_ms"]
    return (
        f"  {s['series']:<8} {s['load']:<12} sent {s['sent']:>6} at {s['send_rate']:>7.1f}/s, "
        f"completed {s['completed']:>6} ({s['completion_rate']:.1f}/s), errors {errs}, "
        f"lost {s['lost']}, ttft p50/p99 {t.get('p50', 0):.1f}/{t.get('p99', 0):.1f}, "
        f"total p99 {tot.get('p99', 0):.1f}, cpu {s['cpu_cores']} "
        f"{'ok' if s.get('kept_up') else 'FELL BEHIND'}"
    )


def _overhead(load: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    """Difference of percentiles (the series are not paired sample by sample)."""
    return {
        q: round(load[q] - floor[q], 3) for q in ("p50", "p90", "p99") if q in load and q in floor
    }


def _knee(steps: Sequence[dict[str, Any]]) -> float | None:
    """Highest offered rate of the steps up to the first that did not keep up."""
    best: float | None = None
    for s in steps:
        if not s["kept_up"]:
            break
        best = s["offered_rate"]
    return best


def _series_result(
    main_phase: Phase, steps: list[Phase], probes: dict[str, Any], p: Params
) -> dict[str, Any]:
    main_s = _summary(main_phase, p)
    step_s = [_summary(s, p) for s in steps]
    floor = probes["direct"]["rate"]["ttft_ms"]
    return {
        "main": main_s,
        "overhead_at_rate_ms": _overhead(main_s["ttft_ms"], floor),
        "steps": step_s,
        "knee_rate": _knee(step_s),
        "knee_stopped_by": next((s["load"] for s in step_s if not s["kept_up"]), None),
    }


# -- the stack ----------------------------------------------------------------------------


async def _measure(p: Params, work: Path, notes: dict[str, Any]) -> dict[str, Any]:
    kafka = LocalKafka(home=work / "home")
    sim_proc: subprocess.Popen[bytes] | None = None
    gateway: GatewayProcess | None = None
    cpu = CpuMeter(work)
    out: dict[str, Any] = {}

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        t = _now()
        bootstrap = await asyncio.to_thread(kafka.up, 0)
        notes["kafka_up_s"] = round(_now() - t, 1)
        raw = sim_config_dict(
            bootstrap=bootstrap,
            sim_port=free_port(),
            limits=LIMITS,
            sim={
                "ttft_ms": p.sim_ttft_ms,
                "inter_token_ms": p.sim_inter_token_ms,
                "output_tokens": p.max_tokens,
            },
        )
        raw.setdefault("gateway", {}).update(dict(p.gateway))
        config_path = work / "quotaflow.yaml"
        config = write_config(raw, config_path)
        sim_log = work / "sim.out"
        sim_proc = start_simulator(config_path, sim_log)
        cpu.roots["simulator"] = sim_proc.pid
        notes["simulator"] = await asyncio.to_thread(
            wait_line, sim_log, b"simulator listening on", sim_proc, 60.0
        )
        t = _now()
        gateway = GatewayProcess(config_path, work / "gateway.log")
        await gateway.start()
        assert gateway.proc is not None
        cpu.roots["gateway"] = notes["gateway_pid"] = gateway.proc.pid
        notes["gateway_start_s"] = round(_now() - t, 1)
        notes["gateway_processes"] = len(_descendants(gateway.proc.pid, _proc_table()))

        peer: LiteLLMPeer | None = None
        if p.litellm:
            try:
                peer = LiteLLMPeer(
                    config, MODEL, p.max_tokens, streaming_logging=p.litellm_streaming_logging
                )
                notes["litellm"] = peer.settings()
            except Exception as exc:  # noqa: BLE001 - reported, the gateway part still runs
                notes["litellm"] = {
                    "version": litellm_version(),
                    "missing_because": f"{type(exc).__name__}: {exc}",
                }
                log(f"litellm part skipped: {notes['litellm']['missing_because']}")
        else:
            notes["litellm"] = {"missing_because": "--no-litellm"}

        direct = Direct(config, p.max_tokens)
        try:
            # 1. probes: the floor, and the peer's overhead at low load.
            probe_targets: dict[str, Target] = {"direct": direct}
            if peer is not None:
                probe_targets["litellm"] = ViaLiteLLM(peer)
            await _sequential(probe_targets, min(10, p.probe_n), p)  # warm connections
            seq = await _sequential(probe_targets, p.probe_n, p)
            probes: dict[str, Any] = {}
            for name, target in probe_targets.items():
                seconds = p.probe_n / p.probe_rate
                label = f"rate_{p.probe_rate:g}"
                rated = await _open_loop(name, label, target, p.probe_rate, seconds, p, cpu)
                probes[name] = {"sequential": _summary(seq[name], p), "rate": _summary(rated, p)}
            out["probes"] = probes
            d = probes["direct"]
            log(
                f"  direct   ttft p50/p99 sequential {d['sequential']['ttft_ms']['p50']:.1f}/"
                f"{d['sequential']['ttft_ms']['p99']:.1f}, at {p.probe_rate:g}/s "
                f"{d['rate']['ttft_ms']['p50']:.1f}/{d['rate']['ttft_ms']['p99']:.1f}"
            )

            # 2, 3. the gateway.
            client = QuotaflowClient(bootstrap, client_id="bench-throughput")
            await client.start()
            try:
                via = ViaGateway(client, p.max_tokens)
                main_phase, steps, drains = await _series("gateway", via, p, cpu, log)
            finally:
                await client.stop()
            out["gateway"] = _series_result(main_phase, steps, probes, p)
            out["gateway"]["drain_s"] = drains
            notes["client_duplicates"] = client.duplicates
            # 4. the peer, with the gateway stopped so it does not share the cores.
            notes["gateway_exit"] = await gateway.stop()
            gateway = None
            if peer is not None:
                await asyncio.sleep(SETTLE_S)
                main_phase, steps, drains = await _series("litellm", ViaLiteLLM(peer), p, cpu, log)
                lit = _series_result(main_phase, steps, probes, p)
                lit["drain_s"] = drains
                lp = probes["litellm"]
                lit["overhead_sequential_ms"] = _overhead(
                    lp["sequential"]["ttft_ms"], probes["direct"]["sequential"]["ttft_ms"]
                )
                lit[f"overhead_rate_{p.probe_rate:g}_ms"] = _overhead(
                    lp["rate"]["ttft_ms"], probes["direct"]["rate"]["ttft_ms"]
                )
                out["litellm"] = lit
        finally:
            await direct.close()
        return out
    finally:
        if gateway is not None:
            notes["gateway_exit"] = await gateway.stop()
        if sim_proc is not None:
            await asyncio.to_thread(stop_proc, sim_proc)
        await asyncio.to_thread(kafka.down)


async def run(p: Params) -> dict[str, Any]:
    """The whole benchmark; returns what goes to the results JSON."""
    started = datetime.now()
    t0 = _now()
    with bench_work("throughput", keep=p.keep) as (work, notes, left):
        measured = await _measure(p, work, notes)
    return {
        "benchmark": NAME,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(_now() - t0, 1),
        "machine": {**machine(), "litellm": litellm_version()},
        "params": {
            "rate_per_s": p.rate,
            "duration_s": p.duration_s,
            "steps": list(p.steps),
            "step_s": p.step_s,
            "keep_up": p.keep_up,
            "p99_bound_ms": p.p99_bound_ms,
            "max_failed": p.max_failed,
            "timeout_s": p.timeout_s,
            "probe_n": p.probe_n,
            "probe_rate_per_s": p.probe_rate,
            "warmup_n": p.warmup_n,
            "max_tokens": p.max_tokens,
            "sim_ttft_ms": p.sim_ttft_ms,
            "sim_inter_token_ms": p.sim_inter_token_ms,
            "limits": LIMITS,
            "prompt": PROMPT,
            "gateway": dict(p.gateway),
        },
        "notes": notes,
        "leftover_processes": left,
        **measured,
    }


# -- reporting ----------------------------------------------------------------------------


def _q(d: dict[str, float], key: str) -> str:
    return f"{d[key]:.1f}" if key in d else "-"


def _pq(d: dict[str, float]) -> str:
    return f"{_q(d, 'p50')} / {_q(d, 'p99')}"


def format_table(result: dict[str, Any]) -> str:
    probes = result.get("probes", {})
    lines = ["probes: ttft (ms)            p50 / p99"]
    for name, pr in probes.items():
        for load in ("sequential", "rate"):
            q = pr[load]["ttft_ms"]
            lines.append(f"  {name:<9}{pr[load]['load']:<20}{_pq(q)}")
    head = (
        f"{'series':<9}{'load':<12}{'offered':>8}{'sent/s':>9}{'sent':>7}{'done':>7}"
        f"{'err':>5}{'lost':>6}{'done/s':>9}{'steady/s':>10}{'ttft p50/p99':>19}"
        f"{'total p50/p99':>19}{'lag p99':>9}  cpu gen/gw/sim/kafka  kept up"
    )
    lines += ["", head, "-" * len(head)]
    for series in ("gateway", "litellm"):
        res = result.get(series)
        if res is None:
            continue
        for s in (res["main"], *res["steps"]):
            c = s["cpu_cores"]
            cores = "/".join(
                f"{c.get(k, 0):.2f}" for k in ("load_generator", "gateway", "simulator", "kafka")
            )
            lines.append(
                f"{series:<9}{s['load']:<12}{s['offered_rate']:>8g}{s['send_rate']:>9.1f}"
                f"{s['sent']:>7}{s['completed']:>7}{sum(s['errors'].values()):>5}{s['lost']:>6}"
                f"{s['completion_rate']:>9.1f}{s['steady_completion_rate']:>10.1f}"
                f"{_pq(s['ttft_ms']):>19}{_pq(s['total_ms']):>19}"
                f"{_q(s['start_lag_ms'], 'p99'):>9}  {cores:<21}{'yes' if s['kept_up'] else 'NO'}"
            )
        o = res["overhead_at_rate_ms"]
        lines.append(
            f"{series:<9}overhead at {result['params']['rate_per_s']:g}/s vs direct "
            f"p50/p99: {_pq(o)}; knee {res['knee_rate']} req/s"
            + (f" (stopped by {res['knee_stopped_by']})" if res["knee_stopped_by"] else "")
        )
        if res.get("drain_s"):
            lines.append(f"{series:<9}backlog drained after (s): {res['drain_s']}")
        for key in (k for k in res if k.startswith("overhead_") and k != "overhead_at_rate_ms"):
            lines.append(f"{series:<9}{key}: {_pq(res[key])}")
        lines.append("")
    lit = result["notes"].get("litellm", {})
    if "missing_because" in lit:
        lines.append(f"litellm: not measured ({lit['missing_because']})")
    lines.append(f"took {result['duration_s']} s; {machine_summary(result['machine'])}")
    return "\n".join(lines)


_MD_SECTION = "throughput: streamed cache-miss requests at a fixed rate, and the knee"
_MD_INTRO = """\
Simulator upstream with 16 output tokens, `ttft_ms` 20, `inter_token_ms` 1, limits far
above the load; open-loop streamed requests (fresh ids, not cacheable) for `duration` s at
`rate` req/s, one row per series: **gateway** (`QuotaflowClient` -> `quotaflow run`, one
task per request, one client consumer) and **litellm** (`litellm.Router` in the load
generator's process, `num_retries=0`, no logging callbacks; run after the gateway was
stopped). **sent/s**: the load generator's achieved send rate; **done/s**: completed /
(last `done` - first send); **err+lost**: error replies and requests with no terminal reply
within the timeout; **ttft**: send -> first content chunk; **total**: send -> `done`;
**overhead**: ttft percentile at `rate` - the direct (openai SDK to the simulator) ttft
percentile at a low rate in the same run. **knee**: the highest step rate (each step
`step_s` s) that kept up: completed / (last `done` - first `done`) >= 95% of offered (that
window leaves out the one latency a short step would otherwise charge), p99 total <= the
bound, nothing failed; `>` means the step after it fell behind. The JSON has every step,
the CPU cores each party used (load generator, gateway with Ray, simulator, broker) and
the litellm version and settings."""
_MD_COLUMNS = (
    "date",
    "machine",
    "bench",
    "series",
    "rate x s",
    "sent",
    "sent/s",
    "done",
    "err+lost",
    "done/s",
    "ttft p50/p99",
    "total p50/p99",
    "overhead p50/p99",
    "knee req/s (p99 total there)",
    "loadavg start -> end",
    "results",
)


def _knee_cell(res: dict[str, Any]) -> str:
    knee = res["knee_rate"]
    if knee is None:
        return f"< {res['steps'][0]['offered_rate']:g}" if res["steps"] else "-"
    at = next(s for s in res["steps"] if s["offered_rate"] == knee)
    tail = f" ({_q(at['total_ms'], 'p99')})"
    return f"{knee:g}{tail}" + ("" if res["knee_stopped_by"] is None else " >")


def record(result: dict[str, Any], json_path: Path) -> Path:
    """One BENCHMARKS.md row per series of this run."""
    date = result["started_at"].replace("T", " ")[:16]
    summary = machine_summary(result["machine"])
    notes = result["notes"]
    loadavg = f"{notes['loadavg_at_start'][0]:.1f} -> {notes['loadavg_at_end'][0]:.1f}"
    prm = result["params"]
    path = json_path
    for series in ("gateway", "litellm"):
        res = result.get(series)
        if res is None:
            continue
        m = res["main"]
        label = series if series == "gateway" else f"litellm {result['machine']['litellm']}"
        if series == "gateway" and prm.get("gateway"):
            label += " (" + ", ".join(f"{k}={v}" for k, v in prm["gateway"].items()) + ")"
        path = add_row(
            _MD_SECTION,
            _MD_INTRO,
            _MD_COLUMNS,
            [
                date,
                summary,
                result["benchmark"],
                label,
                f"{prm['rate_per_s']:g} x {prm['duration_s']:g}",
                str(m["sent"]),
                f"{m['send_rate']:.1f}",
                str(m["completed"]),
                f"{sum(m['errors'].values())} + {m['lost']}",
                f"{m['completion_rate']:.1f}",
                _pq(m["ttft_ms"]),
                _pq(m["total_ms"]),
                _pq(res["overhead_at_rate_ms"]),
                _knee_cell(res),
                loadavg,
                f"`{json_path.relative_to(REPO)}`",
            ],
        )
    return path


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--steps must be comma-separated rates: {text!r}"
        ) from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--steps must be positive rates: {text!r}")
    return rates


def parse_args(argv: Sequence[str] | None = None) -> Params:
    d = Params()
    ap = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__)
    ap.add_argument("--rate", type=float, default=d.rate, help="main run's rate, req/s")
    ap.add_argument("--duration", type=float, default=d.duration_s, help="main run, seconds")
    ap.add_argument(
        "--steps",
        type=_rates,
        default=d.steps,
        help="knee search rates, comma-separated (default %(default)s)",
    )
    ap.add_argument("--step-s", type=float, default=d.step_s, help="seconds per knee step")
    ap.add_argument("--keep-up", type=float, default=d.keep_up, help="done/s >= this x offered")
    ap.add_argument(
        "--p99-bound-ms", type=float, default=d.p99_bound_ms, help="p99 total bound of a step"
    )
    ap.add_argument(
        "--max-failed", type=float, default=d.max_failed, help="fraction errored+lost allowed"
    )
    ap.add_argument("--timeout", type=float, default=d.timeout_s, help="s before a request is lost")
    ap.add_argument("--probe-n", type=int, default=d.probe_n, help="direct/litellm probe samples")
    ap.add_argument("--probe-rate", type=float, default=d.probe_rate, help="probe rate, req/s")
    ap.add_argument("--warmup", type=int, default=d.warmup_n, help="warm-up requests per series")
    ap.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM peer")
    ap.add_argument(
        "--litellm-streaming-logging",
        action="store_true",
        help="keep litellm's per-chunk success logging (off by default: no callback reads it)",
    )
    ap.add_argument(
        "--gateway",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a gateway.<KEY> setting of the gateway under test (JSON value); repeatable",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, broker data)")
    ap.add_argument("--no-record", action="store_true", help="write neither JSON nor BENCHMARKS.md")
    a = ap.parse_args(argv)
    if min(a.rate, a.duration, a.step_s, a.timeout, a.probe_rate) <= 0 or a.probe_n < 1:
        ap.error("--rate, --duration, --step-s, --timeout, --probe-rate > 0; --probe-n >= 1")
    if not 0 < a.keep_up <= 1 or not 0 <= a.max_failed < 1 or a.warmup < 1:
        ap.error("--keep-up in (0, 1], --max-failed in [0, 1), --warmup >= 1")
    return Params(
        rate=a.rate,
        duration_s=a.duration,
        steps=a.steps,
        step_s=a.step_s,
        keep_up=a.keep_up,
        p99_bound_ms=a.p99_bound_ms,
        max_failed=a.max_failed,
        timeout_s=a.timeout,
        probe_n=a.probe_n,
        probe_rate=a.probe_rate,
        warmup_n=a.warmup,
        litellm=not a.no_litellm,
        litellm_streaming_logging=a.litellm_streaming_logging,
        keep=a.keep,
        record=not a.no_record,
        gateway=tuple(a.gateway),
    )


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parse_args(argv)
    result = asyncio.run(run(p))
    publish(NAME, result, format_table(result), record if p.record else None)
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
