"""Utilization under saturation: quotaflow vs a naive openai client vs LiteLLM's Router.

One simulator (`quotaflow sim`, its own process) holds six keys with the same limits
(`--rpm`, `--tpm`; RPM binds with `max_tokens` 16): two per client, so each client has its
own pair of fresh sliding windows and the phases run back to back. Each client gets the
same open-loop offered load, `--load` times the pair's combined RPM, for `--seconds`:

* **quotaflow**: `QuotaflowClient` publishing to `quotaflow run` (its own process, Ray
  started by it, a local broker), at most `--outstanding` requests unanswered at a time
  (a request waiting for a slot is sent when one frees, so past saturation the offered
  load is bounded by that client-side cap); each request carries `deadline_ms` = the end
  of the phase, so the backlog still queued then is shed (`deadline_exceeded`) instead of
  spending quota during the next phase;
* **naive**: one `openai.AsyncOpenAI` per key (SDK defaults, so `max_retries=2` and its
  hidden retries), requests round-robin over the two;
* **litellm**: `litellm.Router` over the two keys as deployments with their rpm/tpm,
  `routing_strategy="usage-based-routing-v2"`, `num_retries` at its default.

The simulator's view decides: its request log gives each upstream call's key, admission
time and status, so utilization = calls admitted per minute / combined RPM (and tokens /
combined TPM) over the whole phase and over the full minutes after the first (the windows
start empty, so the first minute can hold a burst); `GET /stats` gives the 429s and
`max_requests_in_any_60s` per key, which must never exceed the limit. Latency is the
client's, send -> answer, of the requests that succeeded.

    .venv/bin/python -m benchmarks.quota_util [--seconds 150] [--quantize]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import json
import logging
import os
import secrets
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import openai

from benchmarks._common import (
    REPO,
    add_row,
    bench_work,
    http_json,
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
from pipeline.stack import SIM_KEY_ENVS, GatewayProcess, sim_config_dict, write_config
from topics.wire import DoneReply, ErrorReply

__all__ = ["Params", "format_table", "main", "run"]

NAME = "quota_util"
MODEL = "sim-small"  # the simulator's upstream model name (sim_config_dict's)
CLIENTS = ("quotaflow", "naive", "litellm")
LITELLM_POOL = "pool"


@dataclass(frozen=True)
class Params:
    seconds: float = 150.0
    rpm: int = 120
    tpm: int = 60_000
    load: float = 2.0  # offered load / combined RPM of the client's two keys
    max_tokens: int = 16
    outstanding: int = 400  # quotaflow: requests unanswered at once
    grace_s: float = 30.0  # after the phase, how long answers are still awaited
    quantize: bool = False  # the simulator also enforces limit/60 per second
    # The gateway's deployments' `limits.quantize_per_second` (its default: on).
    gateway_quantize: bool = True
    sim_ttft_ms: int = 50
    sim_inter_token_ms: int = 2
    clients: tuple[str, ...] = CLIENTS
    keep: bool = False
    record: bool = True

    @property
    def combined_rpm(self) -> int:
        return 2 * self.rpm

    @property
    def rate(self) -> float:
        """Offered requests per second."""
        return self.load * self.combined_rpm / 60.0


@dataclass
class Outcome:
    """One logical request as its client saw it."""

    id: str
    status: str  # ok | error | unfinished | not_sent
    sent_ms: float = 0.0  # epoch ms
    latency_ms: float | None = None
    code: str | None = None  # error code or exception class
    tokens: int = 0
    attempts: int | None = None  # quotaflow: done.attempts


@dataclass
class Phase:
    client: str
    keys: tuple[str, ...]
    start_ms: float = 0.0
    end_ms: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    max_start_lag_ms: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _body(i: int, p: Params) -> dict[str, Any]:
    # Unique prompts: nothing can be answered from a cache.
    return {
        "messages": [{"role": "user", "content": f"Benchmark request {i}: say something."}],
        "max_tokens": p.max_tokens,
    }


# -- load --------------------------------------------------------------------------------


async def _drive(fn: Callable[[int], Awaitable[Outcome]], p: Params, phase: Phase) -> list[Outcome]:
    """Start `fn(i)` at `p.rate` per second for `p.seconds` whatever the answers do, then
    await the answers for up to `p.grace_s`; those still missing are `unfinished`."""
    loop = asyncio.get_running_loop()
    count = round(p.seconds * p.rate)
    start = loop.time() + 0.05
    phase.start_ms = time.time() * 1000.0 + 50.0
    phase.end_ms = phase.start_ms + p.seconds * 1000.0
    tasks: list[asyncio.Task[Outcome]] = []
    lag = 0.0
    for i in range(count):
        due = start + i / p.rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lag = max(lag, (loop.time() - due) * 1000.0)
        tasks.append(asyncio.ensure_future(fn(i)))
    phase.max_start_lag_ms = round(lag, 3)
    give_up = start + p.seconds + p.grace_s
    await asyncio.wait(tasks, timeout=max(0.1, give_up - loop.time()))
    out: list[Outcome] = []
    for i, task in enumerate(tasks):
        if task.done() and not task.cancelled() and task.exception() is None:
            out.append(task.result())
        else:
            if not task.done():
                task.cancel()
            exc = None if not task.done() or task.cancelled() else task.exception()
            code = type(exc).__name__ if exc is not None else None
            out.append(Outcome(f"{phase.client}-{i}", "unfinished", code=code))
    await asyncio.gather(*tasks, return_exceptions=True)
    return out


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class ViaQuotaflow:
    def __init__(self, client: QuotaflowClient, p: Params, phase: Phase) -> None:
        self.client = client
        self.p = p
        self.phase = phase
        self.slots = asyncio.Semaphore(p.outstanding)

    async def once(self, i: int) -> Outcome:
        async with self.slots:
            sent_ms = time.time() * 1000.0
            if sent_ms >= self.phase.end_ms:
                return Outcome(f"qf-{i}", "not_sent")
            body = {"model": "fast", **_body(i, self.p), "stream": False}
            request = self.client.build(body, deadline_ms=int(self.phase.end_ms), cache="bypass")
            t0 = time.perf_counter()
            await self.client.send(request)
            async for reply in self.client.replies(request.id):
                if isinstance(reply, DoneReply):
                    return Outcome(
                        request.id,
                        "ok",
                        sent_ms,
                        _ms_since(t0),
                        tokens=reply.usage.total_tokens,
                        attempts=reply.attempts,
                    )
                if isinstance(reply, ErrorReply):
                    shed = reply.error.code == "deadline_exceeded"
                    return Outcome(
                        request.id,
                        "unfinished" if shed else "error",
                        sent_ms,
                        _ms_since(t0),
                        code=reply.error.code,
                    )
            raise RuntimeError(f"no terminal reply for {request.id}")


class Naive:
    """One AsyncOpenAI per key, SDK defaults (max_retries=2), round-robin."""

    def __init__(self, base_url: str, keys: Sequence[str], p: Params) -> None:
        self.clients = [openai.AsyncOpenAI(base_url=base_url, api_key=k) for k in keys]
        self.p = p

    async def once(self, i: int) -> Outcome:
        rid = f"naive-{uuid.uuid4().hex}"
        client = self.clients[i % len(self.clients)]
        sent_ms = time.time() * 1000.0
        t0 = time.perf_counter()
        try:
            resp = await client.chat.completions.create(
                model=MODEL,
                **_body(i, self.p),
                extra_headers={"X-Client-Request-Id": rid},
            )
        except openai.APIStatusError as exc:
            return Outcome(rid, "error", sent_ms, _ms_since(t0), code=f"http_{exc.status_code}")
        except openai.APIError as exc:
            return Outcome(rid, "error", sent_ms, _ms_since(t0), code=type(exc).__name__)
        tokens = resp.usage.total_tokens if resp.usage else 0
        return Outcome(rid, "ok", sent_ms, _ms_since(t0), tokens=tokens)

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


def _import_litellm() -> Any:
    # Offline: use the cost map shipped in the package instead of fetching it.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    litellm: Any = importlib.import_module("litellm")
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return litellm


class ViaLiteLLM:
    """`litellm.Router`, usage-based-routing-v2, the two keys as deployments with limits."""

    def __init__(self, base_url: str, keys: Sequence[str], p: Params) -> None:
        self.litellm = _import_litellm()
        self.p = p
        model_list = [
            {
                "model_name": LITELLM_POOL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": base_url,
                    "api_key": key,
                    "rpm": p.rpm,
                    "tpm": p.tpm,
                },
                "rpm": p.rpm,
                "tpm": p.tpm,
            }
            for key in keys
        ]
        self.router = self.litellm.Router(
            model_list=model_list, routing_strategy="usage-based-routing-v2"
        )

    def settings(self) -> dict[str, Any]:
        """What shapes its behaviour here: retries, cooldowns (for the results JSON)."""
        out: dict[str, Any] = {"version": importlib.metadata.version("litellm")}
        with contextlib.suppress(Exception):
            out["num_retries"] = self.router.num_retries
        with contextlib.suppress(Exception):
            s = self.router.settings()
            for name in ("routing_strategy", "allowed_fails", "cooldown_time"):
                out[name] = getattr(s, name, None)
            out["default_litellm_params"] = {
                k: v
                for k, v in (s.default_litellm_params or {}).items()
                if isinstance(v, int | float | str | None)
            }
        return out

    async def once(self, i: int) -> Outcome:
        rid = f"litellm-{uuid.uuid4().hex}"
        sent_ms = time.time() * 1000.0
        t0 = time.perf_counter()
        try:
            resp = await self.router.acompletion(
                model=LITELLM_POOL,
                **_body(i, self.p),
                extra_headers={"X-Client-Request-Id": rid},
            )
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome to count
            code = type(exc).__name__
            if "No deployments available" in str(exc):
                code += ":no_deployments_available"  # refused by the router, no upstream call
            return Outcome(rid, "error", sent_ms, _ms_since(t0), code=code)
        usage = getattr(resp, "usage", None)
        tokens = int(getattr(usage, "total_tokens", 0) or 0)
        return Outcome(rid, "ok", sent_ms, _ms_since(t0), tokens=tokens)


# -- the simulator's view ------------------------------------------------------------------


def _max_in_window(times_ms: list[float], window_ms: float = 60_000.0) -> int:
    """Largest number of `times_ms` within any half-open window of `window_ms`."""
    ordered = sorted(times_ms)
    best = lo = 0
    for hi, t in enumerate(ordered):
        while ordered[lo] <= t - window_ms:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _upstream_view(records: list[dict[str, Any]], phase: Phase, p: Params) -> dict[str, Any]:
    """Per-minute admitted calls and tokens from the simulator's log, for `phase`'s keys."""
    mine = [r for r in records if r.get("key") in phase.keys]
    by_status = Counter(str(r.get("status")) for r in mine)
    admitted = [r for r in mine if r.get("charged_tokens") is not None]
    ok = [r for r in admitted if r.get("status") == 200]

    def at(r: dict[str, Any]) -> float:  # when the simulator admitted the call
        return float(r["ts_ms"]) - float(r["duration_ms"])

    def tokens(r: dict[str, Any]) -> int:
        return int(r.get("prompt_tokens") or 0) + int(r.get("completion_tokens") or 0)

    minutes = []
    for k in range(int(p.seconds // 60)):
        lo, hi = phase.start_ms + 60_000 * k, phase.start_ms + 60_000 * (k + 1)
        calls = [r for r in ok if lo <= at(r) < hi]
        minutes.append(
            {
                "minute": k,
                "ok_calls": len(calls),
                "tokens": sum(tokens(r) for r in calls),
                "util_requests": round(len(calls) / p.combined_rpm, 4),
                "util_tokens": round(sum(tokens(r) for r in calls) / (2 * p.tpm), 4),
            }
        )
    steady = minutes[1:]
    in_phase = [r for r in ok if phase.start_ms <= at(r) < phase.end_ms]
    per_min = 60.0 / p.seconds
    max_60s = {
        key: _max_in_window([at(r) for r in admitted if r.get("key") == key]) for key in phase.keys
    }
    return {
        "upstream_attempts": len(mine),
        "by_status": dict(sorted(by_status.items())),
        "ok_calls": len(ok),
        "ok_calls_in_phase": len(in_phase),
        "ok_calls_after_phase": sum(1 for r in ok if at(r) >= phase.end_ms),
        "util_requests": round(len(in_phase) * per_min / p.combined_rpm, 4),
        "util_tokens": round(sum(tokens(r) for r in in_phase) * per_min / (2 * p.tpm), 4),
        "util_requests_steady": (
            round(sum(m["ok_calls"] for m in steady) / (len(steady) * p.combined_rpm), 4)
            if steady
            else None
        ),
        "util_tokens_steady": (
            round(sum(m["tokens"] for m in steady) / (len(steady) * 2 * p.tpm), 4)
            if steady
            else None
        ),
        "minutes": minutes,
        "max_admitted_in_any_60s_from_log": max_60s,
        # The first 429s exactly: key and seconds since the phase started.
        "429_first": [
            {"key": r.get("key"), "at_s": round((at(r) - phase.start_ms) / 1000.0, 3)}
            for r in sorted((r for r in mine if r.get("status") == 429), key=at)[:100]
        ],
        # When the 429s came, in seconds since the phase started (10 s bins).
        "429_by_10s": dict(
            sorted(
                Counter(
                    str(int((float(r["ts_ms"]) - phase.start_ms) // 10_000) * 10)
                    for r in mine
                    if r.get("status") == 429
                ).items(),
                key=lambda kv: int(kv[0]),
            )
        ),
    }


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the run -------------------------------------------------------------------------------


def _key_envs() -> dict[str, tuple[str, ...]]:
    """Two simulator keys per client (quotaflow's are the gateway's deployments')."""
    envs = {
        "quotaflow": tuple(SIM_KEY_ENVS),
        "naive": ("QF_BENCH_NAIVE_A", "QF_BENCH_NAIVE_B"),
        "litellm": ("QF_BENCH_LITELLM_A", "QF_BENCH_LITELLM_B"),
    }
    for pair in envs.values():
        for env in pair:
            os.environ.setdefault(env, "sk-sim-" + secrets.token_urlsafe(18))
    return envs


async def _phase(
    client_name: str,
    p: Params,
    keys: tuple[str, ...],
    make: Callable[[Phase], Awaitable[tuple[Callable[[int], Awaitable[Outcome]], Any]]],
    sim_url: str,
) -> Phase:
    phase = Phase(client_name, keys)
    fn, closer = await make(phase)
    await asyncio.to_thread(http_json, f"{sim_url}/stats/reset", method="POST")
    t = time.perf_counter()
    try:
        phase.outcomes = await _drive(fn, p, phase)
    finally:
        if closer is not None:
            await closer()
    phase.extra["wall_s"] = round(time.perf_counter() - t, 1)
    stats = await asyncio.to_thread(http_json, f"{sim_url}/stats")
    lanes = stats.get("by_key_model", {})
    phase.stats = {key: lanes.get(f"{key}/{MODEL}", {}) for key in keys}
    return phase


async def _measure(p: Params, work: Path, notes: dict[str, Any]) -> list[Phase]:
    envs = _key_envs()
    kafka: LocalKafka | None = None
    sim_proc = None
    gateway: GatewayProcess | None = None
    phases: list[Phase] = []
    try:
        bootstrap = "127.0.0.1:9"  # replaced below when quotaflow runs
        if "quotaflow" in p.clients:
            kafka = LocalKafka(home=work / "home")
            t = time.perf_counter()
            bootstrap = await asyncio.to_thread(kafka.up, 0)
            notes["kafka_up_s"] = round(time.perf_counter() - t, 1)
        limits = {"rpm": p.rpm, "tpm": p.tpm}
        raw = sim_config_dict(
            bootstrap=bootstrap,
            sim_port=free_port(),
            sim_log=work / "sim.jsonl",
            limits={**limits, "quantize_per_second": p.gateway_quantize},
            sim={
                "ttft_ms": p.sim_ttft_ms,
                "inter_token_ms": p.sim_inter_token_ms,
                "output_tokens": p.max_tokens,
                "quantize_per_second": p.quantize,
            },
        )
        for name in ("naive", "litellm"):
            raw["simulator"]["keys"] += [
                {"api_key_env": env, "models": {MODEL: dict(limits)}} for env in envs[name]
            ]
        config_path = work / "quotaflow.yaml"
        config = write_config(raw, config_path)
        notes["gateway_limits"] = {
            d.name: {
                "rpm": d.limits.rpm,
                "tpm": d.limits.tpm,
                "quantize": d.limits.quantize_per_second,
            }
            for d in config.deployments
        }
        sim_out = work / "sim.out"
        sim_proc = start_simulator(config_path, sim_out)
        line = await asyncio.to_thread(wait_line, sim_out, b"simulator listening on", sim_proc, 60)
        base_url = line.rsplit(" ", 1)[-1].strip()
        sim_url = base_url.removesuffix("/v1")
        notes["simulator"] = line

        for name in p.clients:
            keys = envs[name]
            secrets_ = [os.environ[k] for k in keys]
            print(f"[quota_util] {name}: {p.seconds:g} s at {p.rate:g} req/s", file=sys.stderr)
            if name == "quotaflow":
                t = time.perf_counter()
                gateway = GatewayProcess(config_path, work / "gateway.log")
                await gateway.start()
                assert gateway.proc is not None
                notes["gateway_pid"] = gateway.proc.pid
                notes["gateway_start_s"] = round(time.perf_counter() - t, 1)
                qf = QuotaflowClient(bootstrap, client_id="bench-quota-util")
                await qf.start()
                # Warm-up: two requests through the whole path before the clock starts
                # (they are in the keys' windows, as the gateway knows).
                for i in range(2):
                    body = {"model": "fast", **_body(-1 - i, p), "stream": False}
                    await qf.ask(body, timeout_s=60, cache="bypass")

                async def make_qf(
                    phase: Phase, qf: QuotaflowClient = qf
                ) -> tuple[Callable[[int], Awaitable[Outcome]], Any]:
                    return ViaQuotaflow(qf, p, phase).once, qf.stop

                phases.append(await _phase(name, p, keys, make_qf, sim_url))
                notes["gateway_exit"] = await gateway.stop()
                gateway = None
            elif name == "naive":

                async def make_naive(
                    phase: Phase, secrets_: list[str] = secrets_
                ) -> tuple[Callable[[int], Awaitable[Outcome]], Any]:
                    naive = Naive(base_url, secrets_, p)
                    return naive.once, naive.close

                phases.append(await _phase(name, p, keys, make_naive, sim_url))
            elif name == "litellm":
                box: dict[str, Any] = {}

                async def make_litellm(
                    phase: Phase, secrets_: list[str] = secrets_, box: dict[str, Any] = box
                ) -> tuple[Callable[[int], Awaitable[Outcome]], Any]:
                    via = ViaLiteLLM(base_url, secrets_, p)
                    box["settings"] = via.settings()
                    return via.once, None

                phase = await _phase(name, p, keys, make_litellm, sim_url)
                phase.extra["litellm"] = box.get("settings")
                phases.append(phase)
        records = _read_log(work / "sim.jsonl")
        for phase in phases:
            phase.extra["upstream"] = _upstream_view(records, phase, p)
            ids = Counter(r.get("client_request_id") for r in records if r.get("key") in phase.keys)
            sent = [o for o in phase.outcomes if o.status != "not_sent" and o.id in ids]
            # Upstream calls per logical request (SDK or router retries show as > 1).
            phase.extra["upstream_calls_per_request"] = (
                dict(sorted(Counter(ids[o.id] for o in sent).items())) if sent else None
            )
        return phases
    finally:
        if gateway is not None:
            notes["gateway_exit"] = await gateway.stop()
        if sim_proc is not None:
            await asyncio.to_thread(stop_proc, sim_proc)
        if kafka is not None:
            await asyncio.to_thread(kafka.down)


def _summarise(phase: Phase, p: Params) -> dict[str, Any]:
    out = phase.outcomes
    status = Counter(o.status for o in out)
    errors = Counter(o.code or "?" for o in out if o.status == "error")
    unfinished = Counter(o.code or "no_answer" for o in out if o.status == "unfinished")
    up = phase.extra["upstream"]
    lanes = phase.stats
    rejected = sum(int(s.get("rejected_429", 0)) for s in lanes.values())
    max60 = {k: s.get("max_requests_in_any_60s") for k, s in lanes.items()}
    max60_tokens = {k: s.get("max_tokens_in_any_60s") for k, s in lanes.items()}
    over = {
        k: {"requests": max60.get(k), "tokens": max60_tokens.get(k)}
        for k in lanes
        if (max60.get(k) or 0) > p.rpm or (max60_tokens.get(k) or 0) > p.tpm
    }
    attempts = Counter(o.attempts for o in out if o.attempts is not None)
    return {
        "client": phase.client,
        "keys": list(phase.keys),
        "offered": len(out),
        "offered_rps": round(len(out) / p.seconds, 3),
        "by_status": dict(status),
        "ok": status.get("ok", 0),
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        "unfinished_at_end": dict(unfinished),
        "not_sent": status.get("not_sent", 0),
        "latency_ok_ms": percentiles(
            [o.latency_ms for o in out if o.status == "ok" and o.latency_ms]
        ),
        "latency_error_ms": percentiles(
            [o.latency_ms for o in out if o.status == "error" and o.latency_ms]
        ),
        "util_requests": up["util_requests"],
        "util_tokens": up["util_tokens"],
        "util_requests_steady": up["util_requests_steady"],
        "util_tokens_steady": up["util_tokens_steady"],
        "upstream_429": rejected,
        "max_requests_in_any_60s": max60,
        "max_tokens_in_any_60s": max60_tokens,
        "over_limit": over,
        "gateway_attempts": dict(sorted(attempts.items())) if attempts else None,
        "max_start_lag_ms": phase.max_start_lag_ms,
        "start_ms": phase.start_ms,
        "end_ms": phase.end_ms,
        "simulator_stats": lanes,
        **{k: v for k, v in phase.extra.items() if k != "upstream"},
        "upstream": up,
    }


async def run(p: Params) -> dict[str, Any]:
    started = datetime.now()
    t0 = time.perf_counter()
    phases: list[Phase] = []
    with bench_work("quota-util", keep=p.keep) as (work, notes, left):
        phases = await _measure(p, work, notes)
    return {
        "benchmark": NAME,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "params": {
            "seconds": p.seconds,
            "rpm_per_key": p.rpm,
            "tpm_per_key": p.tpm,
            "combined_rpm": p.combined_rpm,
            "combined_tpm": 2 * p.tpm,
            "load": p.load,
            "offered_rps": p.rate,
            "max_tokens": p.max_tokens,
            "outstanding": p.outstanding,
            "grace_s": p.grace_s,
            "simulator_quantize_per_second": p.quantize,
            "gateway_quantize_per_second": p.gateway_quantize,
            "sim_ttft_ms": p.sim_ttft_ms,
            "sim_inter_token_ms": p.sim_inter_token_ms,
            "clients": list(p.clients),
        },
        "notes": notes,
        "leftover_processes": left,
        "clients": {ph.client: _summarise(ph, p) for ph in phases},
    }


# -- reporting ---------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _max60(c: dict[str, Any], limit: int) -> str:
    values = [v for v in c["max_requests_in_any_60s"].values() if v is not None]
    return f"{max(values) if values else '-'} / {limit}"


def _lat(q: dict[str, float]) -> str:
    return f"{q['p50']:.0f} / {q['p99']:.0f}" if q.get("n") else "-"


def format_table(result: dict[str, Any]) -> str:
    par = result["params"]
    head = (
        f"{'client':<10}{'offered':>8}{'ok':>6}{'req%':>8}{'req% st':>9}{'tok%':>7}"
        f"{'429s':>7}{'max60/lim':>11}{'errors':>8}{'shed':>6}{'p50/p99 ms':>16}"
    )
    lines = [head, "-" * len(head)]
    for c in result["clients"].values():
        shed = sum(c["unfinished_at_end"].values()) + c["not_sent"]
        lines.append(
            f"{c['client']:<10}{c['offered']:>8}{c['ok']:>6}{_pct(c['util_requests']):>8}"
            f"{_pct(c['util_requests_steady']):>9}{_pct(c['util_tokens']):>7}"
            f"{c['upstream_429']:>7}{_max60(c, par['rpm_per_key']):>11}{c['errors']:>8}"
            f"{shed:>6}{_lat(c['latency_ok_ms']):>16}"
        )
        if c["errors_by_code"]:
            lines.append(f"{'':<10}errors: {c['errors_by_code']}")
        if c.get("upstream_calls_per_request"):
            lines.append(f"{'':<10}upstream calls per request: {c['upstream_calls_per_request']}")
        if c["upstream"]["429_by_10s"]:
            lines.append(f"{'':<10}429s by 10 s since start: {c['upstream']['429_by_10s']}")
        if c["over_limit"]:
            lines.append(f"{'':<10}OVER THE LIMIT in some 60 s: {c['over_limit']}")
    lines.append(
        f"{par['seconds']:g} s per client at {par['offered_rps']:g} req/s offered "
        f"({par['load']:g}x {par['combined_rpm']} RPM); quantize sim / gateway: "
        f"{_quantize(par)}; took {result['duration_s']} s; "
        f"{machine_summary(result['machine'])}"
    )
    return "\n".join(lines)


_MD_SECTION = "quota_util"
_MD_INTRO = """\
Utilization under saturation. One simulator, two keys per client, each key limited to
rpm 120 / tpm 60000 (unless the JSON says otherwise; `max_tokens` 16, so RPM binds), the
same open-loop offered load for every client (2x the pair's combined RPM). **quotaflow**:
the gateway, at most 400 requests outstanding, `deadline_ms` = end of the phase (the
backlog still queued then is **shed**); **naive**: `openai.AsyncOpenAI` per key, SDK
defaults (`max_retries=2`), round-robin; **litellm**: `litellm.Router`,
`usage-based-routing-v2`, default `num_retries`. **req %** / **tok %**: calls the
simulator admitted and answered per minute / the combined RPM (TPM), whole phase and
(**steady**) the full minutes after the first; the windows start empty, so a client that
sends at once can fit up to three minutes' worth into 150 s (whole phase > 100%), while a
gateway that spaces requests per second (`quantize_per_second`, its default) cannot.
**429s**: the simulator's for those keys.
**max 60 s / limit**: the most requests any key admitted in any 60 s (must never exceed
the limit). **errors**: requests that ended in an error for the application. Latency:
send -> answer of the successful requests, ms (quotaflow's includes waiting for quota)."""
_MD_COLUMNS = (
    "date",
    "machine",
    "client",
    "seconds",
    "offered rps",
    "ok / offered",
    "quantize sim / gw",
    "req % (steady)",
    "tok %",
    "429s",
    "max 60 s / limit",
    "errors",
    "shed",
    "p50 / p99 ms",
    "results",
)


def _quantize(par: dict[str, Any]) -> str:
    sim = "yes" if par["simulator_quantize_per_second"] else "no"
    gw = "yes" if par.get("gateway_quantize_per_second", True) else "no"
    return f"{sim} / {gw}"


def record(result: dict[str, Any], json_path: Path) -> Path:
    date = result["started_at"].replace("T", " ")[:16]
    summary = machine_summary(result["machine"])
    par = result["params"]
    path = json_path
    for c in result["clients"].values():
        errors = str(c["errors"])
        if c["errors_by_code"]:
            errors += " (" + ", ".join(f"{k} {v}" for k, v in c["errors_by_code"].items()) + ")"
        path = add_row(
            _MD_SECTION,
            _MD_INTRO,
            _MD_COLUMNS,
            [
                date,
                summary,
                c["client"],
                f"{par['seconds']:g}",
                f"{c['offered_rps']:g}",
                f"{c['ok']} / {c['offered']}",
                _quantize(par),
                f"{_pct(c['util_requests'])} ({_pct(c['util_requests_steady'])})",
                _pct(c["util_tokens"]),
                str(c["upstream_429"]),
                _max60(c, par["rpm_per_key"]),
                errors,
                str(sum(c["unfinished_at_end"].values()) + c["not_sent"]),
                _lat(c["latency_ok_ms"]),
                f"`{json_path.relative_to(REPO)}`",
            ],
        )
    return path


def parse_args(argv: Sequence[str] | None = None) -> Params:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quota_util", description=__doc__)
    ap.add_argument("--seconds", type=float, default=150.0, help="load per client (>= 120)")
    ap.add_argument("--rpm", type=int, default=120, help="RPM of each key")
    ap.add_argument("--tpm", type=int, default=60_000, help="TPM of each key")
    ap.add_argument("--load", type=float, default=2.0, help="offered load / combined RPM")
    ap.add_argument("--outstanding", type=int, default=400, help="quotaflow: max unanswered")
    ap.add_argument("--quantize", action="store_true", help="simulator enforces limit/60 per s")
    ap.add_argument(
        "--no-gateway-quantize",
        action="store_true",
        help="gateway deployments with quantize_per_second: false (default: on)",
    )
    ap.add_argument(
        "--clients", default=",".join(CLIENTS), help=f"comma-separated subset of {CLIENTS}"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, broker data)")
    ap.add_argument("--no-record", action="store_true", help="write neither JSON nor BENCHMARKS.md")
    a = ap.parse_args(argv)
    clients = tuple(c.strip() for c in a.clients.split(",") if c.strip())
    if not clients or any(c not in CLIENTS for c in clients):
        ap.error(f"--clients: choose from {CLIENTS}")
    if a.seconds <= 0 or a.rpm < 1 or a.tpm < 1 or a.load <= 0 or a.outstanding < 1:
        ap.error("--seconds, --rpm, --tpm, --load and --outstanding must be positive")
    return replace(
        Params(),
        seconds=a.seconds,
        rpm=a.rpm,
        tpm=a.tpm,
        load=a.load,
        outstanding=a.outstanding,
        quantize=a.quantize,
        gateway_quantize=not a.no_gateway_quantize,
        clients=clients,
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
