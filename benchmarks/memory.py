"""Resident memory of the gateway: at 10,000 requests held, and over a soak at steady load.

One run starts a local broker and the simulator (`quotaflow sim`), then two gateways
(`quotaflow run`, each starting its own Ray), one per phase, each on its own requests
topic, consumer group and internal topics:

* **hold**: the deployments' limits are set low (`--hold-rpm` per deployment, the
  simulator's own stay high), `gateway.max_in_flight` above `--in-flight`, and
  `--in-flight` requests are published at once (`--publish-concurrency` sends at a time).
  Once the ingress has consumed them all and they wait in the quota queue (or run), the
  resident memory of every process of the gateway is read from /proc: the `quotaflow run`
  process (**ingress**), the actor processes by their Ray process title (`ray::Caller`,
  ...) and the rest of the Ray session (gcs, raylet, agents, idle workers: **ray
  runtime**), before the load (**idle**) and with the requests held. Then the gateway is
  stopped (short `drain_timeout_s`): what has not run is answered with an error, and every
  request must be accounted for (done, error, or counted as unanswered).
* **soak**: limits far above the load, `--rate` streamed requests per second, open loop,
  16-token answers, for `--warmup-s` + `--soak-s` seconds; every `--sample-every-s` the
  same per-role figures. **start** is the first sample after the warm-up, **end** the last
  one of the load; growth = end - start. Also reported: the growth without the
  idempotency shards (the store keeps every finished reply until its bounds, by design)
  and over the second half of the soak. `--idempotency-max-entries` bounds the store
  low enough for the warm-up to fill it, so the soak sees it at its steady size.

RSS counts pages shared between processes (libraries) once per process; PSS (from
`/proc/<pid>/smaps_rollup`) splits them, so its total is the machine's real cost. Linux
only (reads /proc). The gateway's ingress/actor figures come from its metrics endpoint.

    .venv/bin/python -m benchmarks.memory [--in-flight 10000] [--soak-s 600] [--rate 50]
        [--idempotency-max-entries N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

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
from pipeline.client import QuotaflowClient
from pipeline.kafka_local import LocalKafka, free_port
from pipeline.stack import GatewayProcess, sim_config_dict, write_config
from topics.wire import DoneReply, ErrorReply, Reply, Request

__all__ = ["ROLES", "Params", "format_table", "main", "run", "sample_memory"]

NAME = "memory"
PROMPT = "Benchmark: say something short."
# Far above what the soak sends (and the simulator's keys in both phases).
LIMITS = {"rpm": 1_000_000, "tpm": 1_000_000_000}
# The roles memory is reported by; actor processes are told by their Ray process title.
ROLES = ("ingress", "quota", "callers", "caches", "selectors", "idempotency", "ray runtime")
_ACTOR_ROLES = {
    "QuotaService": "quota",
    "Caller": "callers",
    "CacheShard": "caches",
    "Selector": "selectors",
    "IdempotencyShard": "idempotency",
}
_RAY_TITLE = re.compile(rb"^ray::(\w+)")
_METRICS_URL = re.compile(r"http://[^\s\"']+/metrics")
# Ingress capacity above the held requests (gateway.max_in_flight = in_flight + this).
HOLD_HEADROOM = 1_000
# After the stop signal the held requests are answered with an error this soon.
HOLD_DRAIN_S = 5.0
# Answering thousands of held requests with an error at shutdown takes a while.
HOLD_ABORT_S = 120.0
GATEWAY_STOP_S = 300.0
# Waits, each with a deadline: all published requests consumed and queued; all answered.
HOLD_WAIT_S = 600.0
ACCOUNT_WAIT_S = 300.0
POLL_S = 1.0
# The gateway just started settles (Ray prestarts workers, connections warm) this long.
IDLE_SETTLE_S = 5.0
# Samples taken with the requests held (POLL_S apart); the largest total is reported.
HOLD_SAMPLES = 3
# A soak request without any reply for this long is counted as unanswered.
SOAK_REPLY_TIMEOUT_S = 120.0
METRICS_REFRESH_S = 1.0
METRICS_TIMEOUT_S = 10.0
_KIB_PER_MIB = 1024


@dataclass(frozen=True)
class Params:
    in_flight: int = 10_000
    hold_rpm: int = 60
    publish_concurrency: int = 512
    soak_s: float = 600.0
    warmup_s: float = 30.0
    rate: float = 50.0
    sample_every_s: float = 10.0
    max_tokens: int = 16
    sim_ttft_ms: int = 20
    sim_inter_token_ms: int = 1
    # resilience.idempotency.max_entries of the soak's gateway (None: the default): a
    # bound the warm-up fills shows the store at its steady size.
    idempotency_max_entries: int | None = None
    keep: bool = False
    record: bool = True


# -- memory of a process tree -----------------------------------------------------------


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (ppid, cmdline) of every process readable in /proc."""
    out: dict[int, tuple[int, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces and parentheses).
        rest = stat[stat.rfind(b")") + 2 :].split()
        out[int(entry.name)] = (int(rest[1]), cmd)
    return out


def _mem_kib(pid: int) -> dict[str, int] | None:
    """RSS, PSS and USS (private pages) of `pid` in KiB, from smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            fields[parts[0][:-1]] = int(parts[1])
    return {
        "rss": fields.get("Rss", 0),
        "pss": fields.get("Pss", 0),
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    }


def _role(pid: int, root: int, cmd: bytes) -> str:
    if pid == root:
        return "ingress"
    m = _RAY_TITLE.match(cmd)
    if m is not None:
        return _ACTOR_ROLES.get(m.group(1).decode(), "ray runtime")
    return "ray runtime"


def _gateway_pids(root: int, procs: dict[int, tuple[int, bytes]]) -> set[int]:
    """`root`, its descendants, and the processes of the Ray session it started."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found = {root}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    session = re.compile(rb"session_[0-9_-]+_%d\b" % root)
    found |= {pid for pid, (_, cmd) in procs.items() if session.search(cmd)}
    return found & set(procs)


def sample_memory(root: int) -> dict[str, Any]:
    """Per-process and per-role memory (MiB) of the gateway whose `quotaflow run` is `root`."""
    procs = _processes()
    rows: list[dict[str, Any]] = []
    roles = {r: {"n": 0, "rss_mib": 0.0, "pss_mib": 0.0, "uss_mib": 0.0} for r in ROLES}
    for pid in sorted(_gateway_pids(root, procs)):
        mem = _mem_kib(pid)
        if mem is None:
            continue
        cmd = procs[pid][1]
        role = _role(pid, root, cmd)
        rows.append(
            {
                "pid": pid,
                "role": role,
                "cmd": cmd.replace(b"\0", b" ").decode(errors="replace").strip()[:120],
                **{f"{k}_mib": round(v / _KIB_PER_MIB, 1) for k, v in mem.items()},
            }
        )
        acc = roles[role]
        acc["n"] += 1
        for k, v in mem.items():
            acc[f"{k}_mib"] += v / _KIB_PER_MIB
    for acc in roles.values():
        for k in ("rss_mib", "pss_mib", "uss_mib"):
            acc[k] = round(acc[k], 1)
    total = {
        k: round(sum(float(a[k]) for a in roles.values()), 1)
        for k in ("rss_mib", "pss_mib", "uss_mib")
    }
    return {"roles": roles, "total": total, "processes": rows}


# -- the gateway's own figures (its metrics endpoint) -----------------------------------


def _metrics_url(log: Path) -> str:
    found = _METRICS_URL.findall(log.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"no metrics URL in {log}")
    return str(found[-1])


def _scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value summed over its labels} (blocking)."""
    with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


_HELD_KEYS = {
    "in_flight": "quotaflow_in_flight_requests",
    "consumed": "quotaflow_records_consumed_total",
    "quota_queue": "quotaflow_quota_queue_depth",
    "leases": "quotaflow_quota_leases",
    # What the stores say they hold (their own accounting), next to their processes' RSS.
    "idempotency_entries": "quotaflow_idempotency_entries",
    "idempotency_bytes": "quotaflow_idempotency_bytes",
    "cache_entries": "quotaflow_cache_entries",
}


def _held(m: dict[str, float]) -> dict[str, int]:
    return {k: int(m.get(name, 0)) for k, name in _HELD_KEYS.items()}


# -- load --------------------------------------------------------------------------------


@dataclass
class Outcomes:
    """How the requests of one phase ended, as the client saw them."""

    published: int = 0
    done: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    # The first message seen per error code (what went wrong, without reading logs).
    messages: dict[str, str] = field(default_factory=dict)
    unanswered: int = 0
    total_ms: list[float] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return self.done + sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "done": self.done,
            "errors": sum(self.errors.values()),
            "error_codes": dict(self.errors),
            "error_messages": self.messages,
            "unanswered": self.unanswered,
            "accounted_for": self.answered + self.unanswered == self.published,
            "done_total_ms": percentiles(self.total_ms),
        }


def _body(p: Params) -> dict[str, Any]:
    return {
        "model": "fast",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": p.max_tokens,
        "stream": True,
    }


async def _read(
    replies: AsyncIterator[Reply], out: Outcomes, t0: float, counted: bool = True
) -> None:
    """Read one request's replies to the terminal one (a reply timeout: unanswered)."""
    try:
        async for reply in replies:
            if isinstance(reply, DoneReply):
                out.done += 1
                if counted:
                    out.total_ms.append((time.perf_counter() - t0) * 1000.0)
            elif isinstance(reply, ErrorReply):
                out.errors[reply.error.code] += 1
                out.messages.setdefault(reply.error.code, reply.error.message[:300])
    except TimeoutError:
        out.unanswered += 1


async def _one(
    client: QuotaflowClient, request: Request, out: Outcomes, reply_timeout_s: float
) -> None:
    """Publish `request` (registered for its replies first) and read them."""
    t0 = time.perf_counter()
    replies = client.replies(request.id, timeout_s=reply_timeout_s)
    await client.send(request)
    out.published += 1
    await _read(replies, out, t0)


async def _send_gated(client: QuotaflowClient, request: Request, gate: asyncio.Semaphore) -> None:
    async with gate:
        await client.send(request)


async def _settle(tasks: Sequence[asyncio.Task[None]], timeout_s: float, out: Outcomes) -> None:
    """Wait for `tasks`; those still waiting at the deadline are counted as unanswered."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    out.unanswered += len(pending)


# -- the phases --------------------------------------------------------------------------


def _phase_config(raw_base: dict[str, Any], phase: str) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(json.dumps(raw_base))
    # Own requests topic, group and internal topics: nothing of the other phase replays.
    raw["topics"] = {"requests": f"bench-mem-{phase}.requests", "internal_prefix": f"bm-{phase}."}
    raw["kafka"]["group_id"] = f"bench-mem-{phase}"
    raw["metrics"] = {"port": 0, "refresh_s": METRICS_REFRESH_S}
    return raw


async def _start_gateway(
    raw: dict[str, Any], work: Path, phase: str, notes: dict[str, Any]
) -> tuple[GatewayProcess, str, Any]:
    path = work / f"{phase}.yaml"
    config = write_config(raw, path)
    log = work / f"gateway-{phase}.log"
    gateway = GatewayProcess(path, log)
    t = time.perf_counter()
    await gateway.start()
    assert gateway.proc is not None
    notes[f"{phase}_gateway_pid"] = gateway.proc.pid
    notes[f"{phase}_gateway_start_s"] = round(time.perf_counter() - t, 1)
    return gateway, _metrics_url(log), config


async def _wait_held(url: str, n: int, outcomes: Outcomes) -> tuple[dict[str, int], float, bool]:
    """Until the ingress has consumed all `n` and every unanswered one reached the quota
    actor (queued or leased); the figures then, seconds waited, whether it got there."""
    t0 = time.perf_counter()
    give_up = t0 + HOLD_WAIT_S
    while True:
        held = _held(await asyncio.to_thread(_scrape, url))
        reached = held["consumed"] >= n and held["quota_queue"] + held["leases"] >= (
            n - outcomes.answered
        )
        if reached or time.perf_counter() > give_up:
            return held, round(time.perf_counter() - t0, 1), reached
        await asyncio.sleep(POLL_S)


async def _hold(p: Params, raw_base: dict[str, Any], work: Path, notes: dict[str, Any]) -> Any:
    raw = _phase_config(raw_base, "hold")
    low = {"rpm": p.hold_rpm}
    for dep in raw["deployments"]:
        dep["limits"] = low
    raw["gateway"] = {
        "max_in_flight": p.in_flight + HOLD_HEADROOM,
        "drain_timeout_s": HOLD_DRAIN_S,
        "abort_timeout_s": HOLD_ABORT_S,
    }
    raw["quota"] = {"queue_max": 2 * (p.in_flight + HOLD_HEADROOM)}
    gateway, url, config = await _start_gateway(raw, work, "hold", notes)
    assert gateway.proc is not None
    root = gateway.proc.pid
    out = Outcomes()
    result: dict[str, Any] = {"limits": low, "in_flight_target": p.in_flight}
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.sleep(IDLE_SETTLE_S)
        result["idle"] = await asyncio.to_thread(sample_memory, root)
        async with QuotaflowClient(
            config.kafka.bootstrap_servers,
            requests_topic=config.topics.requests,
            client_id="bench-memory-hold",
        ) as client:
            gate = asyncio.Semaphore(p.publish_concurrency)
            body = _body(p)
            requests = [client.build(body) for _ in range(p.in_flight)]
            # Registered for their replies before any is sent; read once all are out.
            streams = [client.replies(r.id) for r in requests]
            t = time.perf_counter()
            await asyncio.gather(*(_send_gated(client, r, gate) for r in requests))
            out.published = len(requests)
            tasks = [asyncio.ensure_future(_read(it, out, t, counted=False)) for it in streams]
            result["publish_s"] = round(time.perf_counter() - t, 2)
            held, waited, reached = await _wait_held(url, p.in_flight, out)
            result["wait_held_s"] = waited
            result["all_reached_quota"] = reached
            samples = []
            for _ in range(HOLD_SAMPLES):
                mem = await asyncio.to_thread(sample_memory, root)
                mem["gateway"] = _held(await asyncio.to_thread(_scrape, url))
                mem["answered_so_far"] = out.answered
                samples.append(mem)
                await asyncio.sleep(POLL_S)
            result["held_at_first_check"] = held
            result["samples"] = samples
            result["held"] = max(samples, key=lambda s: s["total"]["rss_mib"])
            t = time.perf_counter()
            result["gateway_exit"] = await gateway.stop(timeout_s=GATEWAY_STOP_S)
            result["stop_s"] = round(time.perf_counter() - t, 1)
            await _settle(tasks, ACCOUNT_WAIT_S, out)
    finally:
        for x in tasks:
            x.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await gateway.stop(timeout_s=GATEWAY_STOP_S)
    result["outcomes"] = out.summary()
    return result


async def _soak_sample(root: int, url: str, t0: float) -> dict[str, Any]:
    """Per-role memory (processes left out), seconds since `t0`, the gateway's figures."""
    mem = await asyncio.to_thread(sample_memory, root)
    mem.pop("processes")
    mem["t_s"] = round(time.perf_counter() - t0, 1)
    try:
        mem["gateway"] = _held(await asyncio.to_thread(_scrape, url))
    except OSError as exc:
        mem["gateway"] = {"error": repr(exc)}
    return mem


async def _sampler(
    root: int, url: str, t0: float, every_s: float, series: list[dict[str, Any]]
) -> None:
    """A sample every `every_s` from `t0` (until cancelled)."""
    i = 0
    while True:
        delay = t0 + i * every_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        series.append(await _soak_sample(root, url, t0))
        i += 1


async def _soak(p: Params, raw_base: dict[str, Any], work: Path, notes: dict[str, Any]) -> Any:
    raw = _phase_config(raw_base, "soak")
    if p.idempotency_max_entries is not None:
        raw["resilience"] = {"idempotency": {"max_entries": p.idempotency_max_entries}}
    gateway, url, config = await _start_gateway(raw, work, "soak", notes)
    assert gateway.proc is not None
    root = gateway.proc.pid
    out = Outcomes()
    series: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[None]] = []
    sampler: asyncio.Task[None] | None = None
    result: dict[str, Any] = {"rate_per_s": p.rate, "warmup_s": p.warmup_s, "soak_s": p.soak_s}
    try:
        await asyncio.sleep(IDLE_SETTLE_S)
        idle = await asyncio.to_thread(sample_memory, root)
        async with QuotaflowClient(
            config.kafka.bootstrap_servers,
            requests_topic=config.topics.requests,
            client_id="bench-memory-soak",
        ) as client:
            body = _body(p)
            count = int((p.warmup_s + p.soak_s) * p.rate)
            t0 = time.perf_counter()
            sampler = asyncio.ensure_future(_sampler(root, url, t0, p.sample_every_s, series))
            lag = 0.0
            for i in range(count):
                due = t0 + i / p.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                lag = max(lag, (time.perf_counter() - due) * 1000.0)
                req = client.build(body)
                tasks.append(asyncio.ensure_future(_one(client, req, out, SOAK_REPLY_TIMEOUT_S)))
                if len(tasks) >= 4 * p.rate:  # keep the list short: drop finished tasks
                    tasks = [x for x in tasks if not x.done()]
            load_s = p.warmup_s + p.soak_s
            rest = t0 + load_s - time.perf_counter()
            if rest > 0:
                await asyncio.sleep(rest)
            result["max_start_lag_ms"] = round(lag, 3)
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            series.append(await _soak_sample(root, url, t0))  # the load's end
            await _settle(tasks, SOAK_REPLY_TIMEOUT_S, out)
            result["after_drain"] = await asyncio.to_thread(sample_memory, root)
    finally:
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        for x in tasks:
            x.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result["gateway_exit"] = await gateway.stop(timeout_s=GATEWAY_STOP_S)
    # The sample due at the end of the load is taken a moment after it: half an interval
    # of slack on either side keeps the samples due at the warm-up's end and the load's.
    slack = p.sample_every_s / 2
    after_warmup = [
        s for s in series if p.warmup_s - slack <= s["t_s"] <= p.warmup_s + p.soak_s + slack
    ]
    result["idle"] = idle
    result["series"] = series
    result["outcomes"] = out.summary()
    result["growth"] = _growth(after_warmup)
    return result


def _growth(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Start (first sample after the warm-up), end (last of the load), growth and max."""
    if len(samples) < 2:
        return {"samples": len(samples)}
    first, mid, last = samples[0], samples[len(samples) // 2], samples[-1]

    def delta(a: float, b: float) -> dict[str, float | None]:
        return {
            "start_mib": a,
            "end_mib": b,
            "growth_mib": round(b - a, 1),
            "growth_pct": round(100.0 * (b - a) / a, 2) if a else None,
        }

    return {
        "samples": len(samples),
        "start_t_s": first["t_s"],
        "end_t_s": last["t_s"],
        "total_rss": delta(first["total"]["rss_mib"], last["total"]["rss_mib"]),
        "total_pss": delta(first["total"]["pss_mib"], last["total"]["pss_mib"]),
        "max_total_rss_mib": max(s["total"]["rss_mib"] for s in samples),
        # The gateway's own figures at start and end (the idempotency store's entries grow
        # with every finished request until its window or max_entries/max_bytes).
        "gateway_start": first.get("gateway"),
        "gateway_end": last.get("gateway"),
        "roles_rss": {
            r: delta(first["roles"][r]["rss_mib"], last["roles"][r]["rss_mib"]) for r in ROLES
        },
        # The idempotency store keeps every finished reply (bounded): what is left without
        # it is what could be a leak; the second half shows whether that still rises.
        "rss_without_idempotency": delta(_without_store(first), _without_store(last)),
        "second_half": {
            "start_t_s": mid["t_s"],
            "total_rss": delta(mid["total"]["rss_mib"], last["total"]["rss_mib"]),
            "rss_without_idempotency": delta(_without_store(mid), _without_store(last)),
        },
    }


def _without_store(sample: dict[str, Any]) -> float:
    """Total RSS of a sample less the idempotency shards' (retained by design)."""
    return round(sample["total"]["rss_mib"] - sample["roles"]["idempotency"]["rss_mib"], 1)


async def _measure(p: Params, work: Path, notes: dict[str, Any]) -> dict[str, Any]:
    kafka = LocalKafka(home=work / "home")
    sim_proc: subprocess.Popen[bytes] | None = None
    try:
        t = time.perf_counter()
        bootstrap = await asyncio.to_thread(kafka.up, 0)
        notes["kafka_up_s"] = round(time.perf_counter() - t, 1)
        raw_base = sim_config_dict(
            bootstrap=bootstrap,
            sim_port=free_port(),
            limits=LIMITS,
            sim={
                "ttft_ms": p.sim_ttft_ms,
                "inter_token_ms": p.sim_inter_token_ms,
                "output_tokens": p.max_tokens,
            },
        )
        sim_config = work / "simulator.yaml"
        write_config(raw_base, sim_config)
        sim_log = work / "sim.out"
        sim_proc = start_simulator(sim_config, sim_log)
        notes["simulator"] = await asyncio.to_thread(
            wait_line, sim_log, b"simulator listening on", sim_proc, 60.0
        )
        out: dict[str, Any] = {"hold": None, "soak": None}
        if p.in_flight > 0:
            out["hold"] = await _hold(p, raw_base, work, notes)
        if p.soak_s > 0:
            out["soak"] = await _soak(p, raw_base, work, notes)
        return out
    finally:
        if sim_proc is not None:
            await asyncio.to_thread(stop_proc, sim_proc)
        await asyncio.to_thread(kafka.down)


async def run(p: Params) -> dict[str, Any]:
    """The whole benchmark; returns what goes to the results JSON."""
    started = datetime.now()
    t0 = time.perf_counter()
    with bench_work("memory", keep=p.keep, owner_keys=("hold_gateway_pid", "soak_gateway_pid")) as (
        work,
        notes,
        left,
    ):
        phases = await _measure(p, work, notes)
    return {
        "benchmark": NAME,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "params": {
            "in_flight": p.in_flight,
            "hold_rpm_per_deployment": p.hold_rpm,
            "publish_concurrency": p.publish_concurrency,
            "soak_s": p.soak_s,
            "warmup_s": p.warmup_s,
            "rate_per_s": p.rate,
            "sample_every_s": p.sample_every_s,
            "max_tokens": p.max_tokens,
            "sim_ttft_ms": p.sim_ttft_ms,
            "sim_inter_token_ms": p.sim_inter_token_ms,
            "idempotency_max_entries": p.idempotency_max_entries,
            "limits": LIMITS,
            "prompt": PROMPT,
        },
        "notes": notes,
        "leftover_processes": left,
        **phases,
    }


# -- reporting ----------------------------------------------------------------------------


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _role_rss(role: str) -> Callable[[dict[str, Any]], float]:
    def pick(sample: dict[str, Any]) -> float:
        return float(sample["roles"][role]["rss_mib"])

    return pick


def format_table(result: dict[str, Any]) -> str:
    hold, soak = result.get("hold"), result.get("soak")
    n = result["params"]["in_flight"]
    head = (
        f"{'memory (RSS MiB)':<18}{'idle':>9}{f'@{n}':>9}{'delta':>9}"
        f"{'soak start':>12}{'end':>9}{'growth':>9}{'max':>9}"
    )
    lines = [head, "-" * len(head)]
    g = (soak or {}).get("growth") or {}
    window = [
        s
        for s in (soak or {}).get("series", [])
        if g.get("samples", 0) >= 2 and g["start_t_s"] <= s["t_s"] <= g["end_t_s"]
    ]

    def row(label: str, pick: Callable[[dict[str, Any]], float]) -> str:
        idle = pick(hold["idle"]) if hold else None
        held = pick(hold["held"]) if hold else None
        d = None if idle is None or held is None else held - idle
        start = end = grow = top = None
        if window:
            start, end = pick(window[0]), pick(window[-1])
            grow, top = end - start, max(pick(s) for s in window)
        return (
            f"{label:<18}{_mib(idle):>9}{_mib(held):>9}{_mib(d):>9}"
            f"{_mib(start):>12}{_mib(end):>9}{_mib(grow):>9}{_mib(top):>9}"
        )

    for r in ROLES:
        lines.append(row(r, _role_rss(r)))
    lines.append(row("total RSS", lambda s: s["total"]["rss_mib"]))
    lines.append(row("total PSS", lambda s: s["total"]["pss_mib"]))
    lines.append("")
    if hold:
        o, h = hold["outcomes"], hold["held"]["gateway"]
        lines.append(
            f"hold: {o['published']} published in {hold['publish_s']} s; held: ingress in "
            f"flight {h['in_flight']}, quota queue {h['quota_queue']}, leases {h['leases']}"
            f"{'' if hold['all_reached_quota'] else ' (not all reached the quota queue)'}; "
            f"done {o['done']}, errors {o['errors']} {o['error_codes']}, "
            f"unanswered {o['unanswered']}"
        )
    if soak:
        o = soak["outcomes"]
        lines.append(
            f"soak: {soak['rate_per_s']:g} req/s for {soak['warmup_s']:g} + {soak['soak_s']:g} s; "
            f"done {o['done']}, errors {o['errors']} {o['error_codes']}, "
            f"unanswered {o['unanswered']}; done p50/p99 "
            f"{o['done_total_ms'].get('p50', '-')} / {o['done_total_ms'].get('p99', '-')} ms"
        )
        if g.get("samples", 0) >= 2:
            t = g["total_rss"]
            lines.append(
                f"soak total RSS {t['start_mib']} -> {t['end_mib']} MiB "
                f"({t['growth_mib']:+} MiB, {t['growth_pct']:+}%), max {g['max_total_rss_mib']}"
            )
            w, h = g["rss_without_idempotency"], g["second_half"]
            lines.append(
                f"without the idempotency store {w['start_mib']} -> {w['end_mib']} MiB "
                f"({w['growth_mib']:+} MiB); second half (from {h['start_t_s']} s): total "
                f"{h['total_rss']['growth_mib']:+} MiB, without the store "
                f"{h['rss_without_idempotency']['growth_mib']:+} MiB"
            )
            end = g.get("gateway_end") or {}
            if "idempotency_entries" in end:
                lines.append(
                    f"idempotency store at the end: {end['idempotency_entries']} entries, "
                    f"{end['idempotency_bytes'] / 2**20:.1f} MiB by its own count"
                )
    lines.append(f"took {result['duration_s']} s; {machine_summary(result['machine'])}")
    return "\n".join(lines)


_MD_SECTION = "memory"
_MD_INTRO = """\
Resident memory of `quotaflow run` and every process it started (its Ray session), read
from `/proc/<pid>/smaps_rollup`. **hold**: deployments limited to the JSON's
`hold_rpm_per_deployment` (the simulator's keys not), N requests published at once,
measured once the ingress has consumed them all and they wait in the quota queue;
**idle** is the same gateway before the load. **held** = the ingress's in-flight gauge /
the quota queue at the sample. **per role** at N: ingress (the `quotaflow run` process) /
quota / callers / caches / selectors / idempotency / ray runtime (gcs, raylet, agents,
idle workers), RSS MiB. **total**: RSS (shared library pages counted per process) and PSS
(shared pages split: the machine's real cost). **accounted**: after the sample the gateway
is stopped and the requests not run are answered with an error: done / errors /
unanswered. **soak**: streamed open-loop load (16-token answers, limits far above it),
total RSS at the first sample after the warm-up and at the end of the load, growth and
the max in between; **soak done / errors**: the requests of the soak."""
_MD_COLUMNS = (
    "date",
    "machine",
    "N",
    "held in flight / queued",
    "idle total MiB",
    "at N total RSS (PSS) MiB",
    "per role at N",
    "accounted done / errors / unanswered",
    "soak req/s x s",
    "soak RSS start -> end MiB",
    "growth MiB (%)",
    "soak max MiB",
    "soak done / errors",
    "loadavg start -> end",
    "results",
)


def record(result: dict[str, Any], json_path: Path) -> Path:
    """One BENCHMARKS.md row for the run."""
    hold, soak = result.get("hold"), result.get("soak")
    notes = result["notes"]
    cells = [
        result["started_at"].replace("T", " ")[:16],
        machine_summary(result["machine"]),
        str(result["params"]["in_flight"]),
    ]
    if hold:
        h, o = hold["held"], hold["outcomes"]
        cells += [
            f"{h['gateway']['in_flight']} / {h['gateway']['quota_queue']}",
            _mib(hold["idle"]["total"]["rss_mib"]),
            f"{_mib(h['total']['rss_mib'])} ({_mib(h['total']['pss_mib'])})",
            " / ".join(_mib(h["roles"][r]["rss_mib"]) for r in ROLES),
            f"{o['done']} / {o['errors']} / {o['unanswered']}",
        ]
    else:
        cells += ["-"] * 5
    g = (soak or {}).get("growth") or {}
    if soak and g.get("samples", 0) >= 2:
        t, o = g["total_rss"], soak["outcomes"]
        cells += [
            f"{soak['rate_per_s']:g} x {soak['soak_s']:g}",
            f"{t['start_mib']} -> {t['end_mib']}",
            f"{t['growth_mib']:+} ({t['growth_pct']:+}%); without the idempotency store "
            f"{g['rss_without_idempotency']['growth_mib']:+}, its second half "
            f"{g['second_half']['rss_without_idempotency']['growth_mib']:+}",
            _mib(g["max_total_rss_mib"]),
            f"{o['done']} / {o['errors']}",
        ]
    else:
        cells += ["-"] * 5
    cells += [
        f"{notes['loadavg_at_start'][0]:.1f} -> {notes['loadavg_at_end'][0]:.1f}",
        f"`{json_path.relative_to(REPO)}`",
    ]
    return add_row(_MD_SECTION, _MD_INTRO, _MD_COLUMNS, cells)


def parse_args(argv: Sequence[str] | None = None) -> Params:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    ap.add_argument("--in-flight", type=int, default=10_000, help="requests held (0: skip)")
    ap.add_argument("--hold-rpm", type=int, default=60, help="rpm per deployment while held")
    ap.add_argument("--publish-concurrency", type=int, default=512, help="sends at a time")
    ap.add_argument("--soak-s", type=float, default=600.0, help="soak after warm-up (0: skip)")
    ap.add_argument("--warmup-s", type=float, default=30.0, help="soak warm-up, not measured")
    ap.add_argument("--rate", type=float, default=50.0, help="soak load, req/s open loop")
    ap.add_argument("--sample-every-s", type=float, default=10.0, help="soak sampling interval")
    ap.add_argument(
        "--idempotency-max-entries",
        type=int,
        default=None,
        help="the soak gateway's resilience.idempotency.max_entries (default: the config's)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, broker data)")
    ap.add_argument("--no-record", action="store_true", help="write neither JSON nor BENCHMARKS.md")
    a = ap.parse_args(argv)
    if a.idempotency_max_entries is not None and a.idempotency_max_entries < 1:
        ap.error(f"--idempotency-max-entries must be >= 1, not {a.idempotency_max_entries}")
    if a.in_flight < 0 or a.hold_rpm < 1 or a.publish_concurrency < 1:
        ap.error("--in-flight must be >= 0, --hold-rpm and --publish-concurrency >= 1")
    if a.soak_s < 0 or a.warmup_s < 0 or a.rate <= 0 or a.sample_every_s <= 0:
        ap.error("--soak-s and --warmup-s must be >= 0, --rate and --sample-every-s > 0")
    return Params(
        in_flight=a.in_flight,
        hold_rpm=a.hold_rpm,
        publish_concurrency=a.publish_concurrency,
        soak_s=a.soak_s,
        warmup_s=a.warmup_s,
        rate=a.rate,
        sample_every_s=a.sample_every_s,
        idempotency_max_entries=a.idempotency_max_entries,
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
