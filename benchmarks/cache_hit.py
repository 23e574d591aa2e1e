"""The cache's hit path end to end: publish -> `done` on the reply topic, at 10k and 100k entries.

One run starts a local broker and the simulator, then for each series (exact; semantic
too when the extra `quotaflow[semantic]` is installed) and each size:

1. writes `size` cached answers to the changelog topic `<prefix>cache` (what callers'
   answers become; semantic records carry their embeddings, computed here with the
   shards' model), so a fresh gateway's shards restore them at start;
2. starts the gateway (`quotaflow run`, Ray started by it) and times its start-up, the
   restore included;
3. sends questions whose answers are cached with `QuotaflowClient` (fresh ids, streamed,
   `temperature: 0`): **sequential** (one at a time: latency) and **window** (W in
   flight: throughput and latency under load); exact: the stored question itself;
   semantic: its paraphrase ("How can I ..." for the stored "How do I ...");
4. reads the shards' own figures (`quotaflow status --json`: lookup ms, bytes, entries).

Then the **kafka floor** series: the same questions, client and load against a bare
responder (`benchmarks/_echo.py`: one process, plain aiokafka, a dict of the answers, the
same reply and usage records a hit writes, no gateway), so the hit path's throughput is
quoted against what this broker and client allow on this machine in the same run.

The questions are synthetic help-desk questions ("How do I <action> my <thing> on my
<brand> <device>?"), all in one tenant with one system prompt: one semantic scope, so
every semantic lookup searches all `size` entries (the worst case of brute force).

    nice -n 5 .venv/bin/python -m benchmarks.cache_hit [--sizes 10000,100000] [--n 300]
        [--window 64] [--window-n 3000] [--no-semantic] [--no-floor] [--shards N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from actors._cache_keys import cache_key, semantic_parts, tenant_scope
from actors._cache_store import cache_topic, encode_record
from actors._messages import CacheEntry
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
from pipeline._admin import ensure_topics
from pipeline.client import QuotaflowClient
from pipeline.kafka_local import LocalKafka, free_port
from pipeline.stack import GatewayProcess, sim_config_dict, write_config
from topics.config import CacheConfig, Config
from topics.wire import DoneReply, Request

__all__ = ["Params", "format_table", "main", "run"]

NAME = "cache_hit"
LIMITS = {"rpm": 1_000_000, "tpm": 1_000_000_000}
MODEL = "fast"
TENANT = "helpdesk"
SYSTEM = "You are the help desk of an electronics shop. Answer in one sentence."
MAX_TOKENS = 16
# Every entry fits one shard: a semantic scope lives on one shard.
MAX_ENTRIES = 250_000
MAX_BYTES = 512 * 1024 * 1024
# Requests sent before the measured ones (connections, JIT of the paths, first batches).
WARMUP = 30
# One request through the whole stack: generous on a loaded 2-core machine.
ANSWER_TIMEOUT_S = 120.0
GATEWAY_READY_S = 900.0
STATUS_TIMEOUT_S = 120.0
_STATUS_CMD = (sys.executable, "-m", "pipeline.cli", "status")
SEED = 5
_ACTIONS = (
    "reset", "change", "update", "recover", "delete", "export", "back up", "restore",
    "share", "lock", "unlock", "verify", "transfer", "cancel", "renew", "download",
    "upload", "sync", "rename", "print", "scan", "encrypt", "archive", "close", "open",
)  # fmt: skip
_THINGS = (
    "password", "account", "email address", "phone number", "billing address",
    "subscription", "profile picture", "contacts", "calendar", "photos", "documents",
    "invoices", "order history", "wish list", "payment card", "bank details",
    "security questions", "two-factor settings", "notification settings",
    "privacy settings", "shipping address", "gift card", "loyalty points", "username",
    "display name", "family plan", "device list", "saved searches", "playlists",
    "bookmarks", "messages", "voicemail", "backup codes", "API keys", "team members",
    "workspace", "project files", "shared folders", "tax forms", "receipts",
)  # fmt: skip
_BRANDS = (
    "Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Wonka", "Hooli",
    "Vandelay", "Soylent",
)  # fmt: skip
_DEVICES = (
    "phone", "tablet", "laptop", "watch", "TV", "router", "printer", "camera", "speaker",
    "console",
)  # fmt: skip


@dataclass(frozen=True)
class Params:
    sizes: tuple[int, ...] = (10_000, 100_000)
    n: int = 300
    window: int = 64
    window_n: int = 3_000
    semantic: bool = True
    floor: bool = True
    shards: int = CacheConfig().shards
    keep: bool = False
    record: bool = True


@dataclass
class Question:
    stored: str
    paraphrase: str
    answer: str


def questions(n: int) -> list[Question]:
    """`n` distinct questions (a fixed shuffle of every combination), with answers."""
    combos = list(itertools.product(_ACTIONS, _THINGS, _BRANDS, _DEVICES))
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} distinct questions")
    random.Random(SEED).shuffle(combos)
    out = []
    for i, (a, t, b, d) in enumerate(combos[:n]):
        out.append(
            Question(
                stored=f"How do I {a} my {t} on my {b} {d}?",
                paraphrase=f"How can I {a} my {t} on my {b} {d}?",
                answer=f"[{i}] On your {b} {d}, open Settings, pick {t} and choose {a}.",
            )
        )
    return out


def _body(text: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }


def _request(text: str) -> Request:
    return msgspec.convert(
        {"id": uuid.uuid4().hex, "tenant": TENANT, "request": _body(text)}, Request
    )


def _verifier_ready() -> bool:
    try:
        from actors._semantic import VERIFIER_WEIGHTS
    except ImportError:
        return False
    return Path(VERIFIER_WEIGHTS).exists()


def semantic_available() -> str | None:
    """Why the semantic series cannot run, or None."""
    try:
        from actors._semantic import model_file

        model_file()
    except Exception as exc:  # noqa: BLE001 - ImportError, SemanticUnavailable: say it
        return f"{type(exc).__name__}: {exc}"
    return None


# -- the changelog prefill ----------------------------------------------------------------


class Embeddings:
    """The shards' embedding model in this process, with its vectors cached per text."""

    def __init__(self) -> None:
        from actors._semantic import Embedder

        self._embedder = Embedder()
        self._vectors: dict[str, bytes] = {}
        self.seconds = 0.0

    def vectors(self, texts: list[str]) -> list[bytes]:
        todo = [t for t in texts if t not in self._vectors]
        t0 = time.perf_counter()
        for i in range(0, len(todo), 256):
            chunk = todo[i : i + 256]
            rows = self._embedder.embed(chunk)
            for text, row in zip(chunk, rows, strict=True):
                self._vectors[text] = row.astype("<f4").tobytes()
            print(f"  embedded {min(i + 256, len(todo))}/{len(todo)}", file=sys.stderr)
        self.seconds += time.perf_counter() - t0
        return [self._vectors[t] for t in texts]


async def prefill(
    config: Config, qs: Sequence[Question], *, semantic: bool, emb: Embeddings | None
) -> dict[str, Any]:
    """Write one changelog record per question (as a caller's answer would become)."""
    cfg = config.cache
    scope = tenant_scope(TENANT, cfg)
    vectors = emb.vectors([q.stored for q in qs]) if emb is not None else [None] * len(qs)
    now = time.time()
    producer = AIOKafkaProducer(
        bootstrap_servers=config.kafka.bootstrap_servers, linger_ms=20, acks="all"
    )
    await producer.start()
    t0 = time.perf_counter()
    size = 0
    try:
        futures = []
        for q, vec in zip(qs, vectors, strict=True):
            req = _request(q.stored)
            key = cache_key(req, MODEL, scope=scope, semantic=semantic)
            parts = semantic_parts(req, MODEL, scope=scope) if semantic else None
            entry = CacheEntry(
                key=key,
                text=q.answer,
                finish_reason="stop",
                prompt_tokens=40,
                completion_tokens=MAX_TOKENS,
                upstream_model="sim-small",
                model=MODEL,
                stored_at=now,
                scope=parts.scope if parts else None,
                prompt=parts.text if parts else None,
            )
            value = encode_record(entry, vec)
            size += len(value)
            futures.append(
                await producer.send(
                    cache_topic(config.topics.internal_prefix), key=key.encode(), value=value
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return {"records": len(qs), "bytes": size, "write_s": round(time.perf_counter() - t0, 2)}


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Sample:
    ms: float
    cache: str
    right: bool
    inside_ms: float | None


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)
    elapsed_s: float = 0.0


async def _one(client: QuotaflowClient, q: Question, *, semantic: bool) -> Sample:
    t0 = time.perf_counter()
    answer = await client.ask(
        _request(q.paraphrase if semantic else q.stored), timeout_s=ANSWER_TIMEOUT_S
    )
    ms = (time.perf_counter() - t0) * 1000.0
    done = answer.terminal
    if not isinstance(done, DoneReply):
        return Sample(ms, f"error:{done.error.code}", False, None)
    return Sample(ms, done.cache, answer.text == q.answer, done.timing.total_ms)


async def _sequential(
    client: QuotaflowClient, qs: Sequence[Question], n: int, *, semantic: bool
) -> Series:
    rng = random.Random(SEED + 1)
    out = Series()
    t0 = time.perf_counter()
    for _ in range(n):
        out.samples.append(await _one(client, rng.choice(qs), semantic=semantic))
    out.elapsed_s = time.perf_counter() - t0
    return out


async def _windowed(
    client: QuotaflowClient, qs: Sequence[Question], n: int, window: int, *, semantic: bool
) -> Series:
    rng = random.Random(SEED + 2)
    picks = [rng.choice(qs) for _ in range(n)]
    sem = asyncio.Semaphore(window)
    out = Series()

    async def go(q: Question) -> None:
        async with sem:
            out.samples.append(await _one(client, q, semantic=semantic))

    t0 = time.perf_counter()
    await asyncio.gather(*(go(q) for q in picks))
    out.elapsed_s = time.perf_counter() - t0
    return out


def _summary(series: Series) -> dict[str, Any]:
    s = series.samples
    hits = [x for x in s if x.cache in ("exact", "semantic")]
    return {
        "n": len(s),
        "elapsed_s": round(series.elapsed_s, 2),
        "per_s": round(len(s) / series.elapsed_s, 1) if series.elapsed_s else None,
        "caches": dict(Counter(x.cache for x in s)),
        "wrong_answers": sum(1 for x in hits if not x.right),
        "hit_ms": percentiles([x.ms for x in hits]),
        "hit_inside_gateway_ms": percentiles([x.inside_ms for x in hits if x.inside_ms]),
        "all_ms": percentiles([x.ms for x in s]),
    }


def _status(config_path: Path, gateway_log: Path) -> dict[str, Any]:
    line = [ln for ln in gateway_log.read_text().splitlines() if "gateway running" in ln][-1]
    address = line.rsplit("ray ", 1)[1].rstrip(")")
    out = subprocess.run(
        [*_STATUS_CMD, "--config", str(config_path), "--once", "--json"],
        env={**os.environ, "RAY_ADDRESS": address},
        capture_output=True,
        check=False,
        cwd=REPO,
        timeout=STATUS_TIMEOUT_S,
    )
    if out.returncode != 0:
        return {"error": out.stderr.decode(errors="replace")[-2000:]}
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def _shards(status: dict[str, Any]) -> list[dict[str, Any]]:
    keep = (
        "shard",
        "entries",
        "bytes",
        "restored",
        "lookups",
        "exact_hits",
        "semantic_hits",
        "lookup_ms_p50",
        "lookup_ms_p99",
    )
    out = []
    for c in status.get("caches", []):
        row = {k: c.get(k) for k in keep}
        if "semantic" in c:
            row["semantic"] = c["semantic"]
        out.append(row)
    return out


async def _phase(
    p: Params,
    work: Path,
    raw_base: dict[str, Any],
    *,
    kind: str,
    size: int,
    qs: Sequence[Question],
    written: int,
    emb: Embeddings | None,
    notes: dict[str, Any],
) -> dict[str, Any]:
    semantic = kind == "semantic"
    raw = json.loads(json.dumps(raw_base))
    # A requests topic per phase: a new consumer group must not replay the last one's.
    raw["topics"] = {
        "requests": f"bench-{kind}-{size}.requests",
        "internal_prefix": f"bench-{kind}.",
    }
    raw["kafka"]["group_id"] = f"bench-{kind}-{size}"
    raw["metrics"] = {"enabled": False}
    raw["cache"] = {"shards": p.shards, "max_entries": MAX_ENTRIES, "max_bytes": MAX_BYTES}
    verifier = semantic and _verifier_ready()
    if semantic:
        # Without trained verifier weights the second stage is off (cosine alone).
        raw["cache"]["semantic"] = {"enabled": True} | (
            {} if verifier else {"verifier_min_probability": 0.0}
        )
    path = work / f"{kind}-{size}.yaml"
    config = write_config(raw, path)
    await ensure_topics(config)
    t = time.perf_counter()
    fill = await prefill(config, qs[written:size], semantic=semantic, emb=emb)
    fill["embed_s"] = round(emb.seconds, 1) if emb else None
    fill["prefill_s"] = round(time.perf_counter() - t, 1)
    log = work / f"gateway-{kind}-{size}.log"
    gateway = GatewayProcess(path, log)
    t = time.perf_counter()
    await gateway.start(ready_timeout_s=GATEWAY_READY_S)
    start_s = round(time.perf_counter() - t, 1)
    assert gateway.proc is not None
    notes.setdefault("gateway_pids", []).append(gateway.proc.pid)
    try:
        seq, win = await _load(p, config, qs[:size], semantic=semantic)
        status = await asyncio.to_thread(_status, path, log)
    finally:
        code = await gateway.stop()
    return {
        "kind": kind,
        "entries": size,
        "verifier": verifier if semantic else None,
        "prefill": fill,
        "gateway_start_s": start_s,
        "gateway_exit": code,
        "sequential": _summary(seq),
        "window": {"window": p.window, **_summary(win)},
        "shards": _shards(status),
        "status_error": status.get("error"),
    }


async def _load(
    p: Params, config: Config, qs: Sequence[Question], *, semantic: bool
) -> tuple[Series, Series]:
    """Warm-up, then the sequential and the window series, through one client."""
    async with QuotaflowClient(
        config.kafka.bootstrap_servers, requests_topic=config.topics.requests, tenant=TENANT
    ) as client:
        await _sequential(client, qs, WARMUP, semantic=semantic)
        seq = await _sequential(client, qs, p.n, semantic=semantic)
        win = await _windowed(client, qs, p.window_n, p.window, semantic=semantic)
    return seq, win


async def _floor_phase(
    p: Params, work: Path, raw_base: dict[str, Any], qs: Sequence[Question]
) -> dict[str, Any]:
    """The exact series' load against the bare responder of `benchmarks._echo`."""
    raw = json.loads(json.dumps(raw_base))
    raw["topics"] = {"requests": "bench-floor.requests", "internal_prefix": "bench-floor."}
    raw["kafka"]["group_id"] = "bench-floor"
    path = work / "floor.yaml"
    config = write_config(raw, path)
    await ensure_topics(config)
    answers = work / "floor-answers.json"
    answers.write_text(json.dumps({q.stored: q.answer for q in qs}))
    log = work / "floor.out"
    with log.open("wb") as out:
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "benchmarks._echo", str(path), str(answers)],
            stdout=out,
            stderr=out,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        await asyncio.to_thread(wait_line, log, b"echo ready", proc, GATEWAY_READY_S)
        seq, win = await _load(p, config, qs, semantic=False)
    finally:
        await asyncio.to_thread(stop_proc, proc)
    return {
        "kind": "kafka floor",
        "entries": len(qs),
        "verifier": None,
        "prefill": None,
        "gateway_start_s": None,
        "gateway_exit": proc.returncode,
        "sequential": _summary(seq),
        "window": {"window": p.window, **_summary(win)},
        "shards": [],
        "status_error": None,
    }


async def _measure(p: Params, work: Path, notes: dict[str, Any]) -> list[dict[str, Any]]:
    kafka = LocalKafka(home=work / "home")
    sim_proc: subprocess.Popen[bytes] | None = None
    try:
        t = time.perf_counter()
        bootstrap = await asyncio.to_thread(kafka.up, 0)
        notes["kafka_up_s"] = round(time.perf_counter() - t, 1)
        raw = sim_config_dict(
            bootstrap=bootstrap,
            sim_port=free_port(),
            sim_log=work / "sim.jsonl",
            limits=LIMITS,
            sim={"ttft_ms": 20, "inter_token_ms": 1, "output_tokens": MAX_TOKENS},
        )
        sim_path = work / "sim.yaml"
        write_config(raw, sim_path)
        sim_out = work / "sim.out"
        sim_proc = start_simulator(sim_path, sim_out)
        notes["simulator"] = await asyncio.to_thread(
            wait_line, sim_out, b"simulator listening on", sim_proc, 60.0
        )
        qs = questions(max(p.sizes))
        kinds = ["exact"]
        why_not = semantic_available() if p.semantic else "--no-semantic"
        if why_not is None:
            kinds.append("semantic")
        else:
            notes["semantic_skipped"] = why_not
        phases = []
        for kind in kinds:
            emb = Embeddings() if kind == "semantic" else None
            written = 0
            for size in sorted(p.sizes):
                print(f"== {kind}, {size} entries", file=sys.stderr, flush=True)
                phases.append(
                    await _phase(
                        p,
                        work,
                        raw,
                        kind=kind,
                        size=size,
                        qs=qs,
                        written=written,
                        emb=emb,
                        notes=notes,
                    )
                )
                written = size
        if p.floor:
            print("== kafka floor", file=sys.stderr, flush=True)
            phases.append(await _floor_phase(p, work, raw, qs[: max(p.sizes)]))
        return phases
    finally:
        if sim_proc is not None:
            await asyncio.to_thread(stop_proc, sim_proc)
        await asyncio.to_thread(kafka.down)


async def run(p: Params) -> dict[str, Any]:
    """The whole benchmark; returns what goes to the results JSON."""
    started = datetime.now()
    t0 = time.perf_counter()
    with bench_work("cache", keep=p.keep, owner_keys=("gateway_pids",)) as (work, notes, left):
        phases = await _measure(p, work, notes)
    return {
        "benchmark": NAME,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "params": {
            "sizes": list(p.sizes),
            "n": p.n,
            "window": p.window,
            "window_n": p.window_n,
            "warmup": WARMUP,
            "shards": p.shards,
            "system_prompt": SYSTEM,
            "max_tokens": MAX_TOKENS,
        },
        "notes": notes,
        "leftover_processes": left,
        "phases": phases,
    }


# -- reporting ----------------------------------------------------------------------------


def _pair(q: dict[str, Any]) -> str:
    return f"{q.get('p50', '-')} / {q.get('p99', '-')}"


def _caches(s: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(s["caches"].items()))


def _lookup_ms(ph: dict[str, Any]) -> str:
    busy = [s for s in ph["shards"] if s.get("lookups")]
    return "; ".join(f"{s['lookup_ms_p50']} / {s['lookup_ms_p99']}" for s in busy) or "-"


def _mib(ph: dict[str, Any]) -> str:
    return " + ".join(f"{(s.get('bytes') or 0) / 2**20:.1f}" for s in ph["shards"]) or "-"


def _floor_per_s(result: dict[str, Any]) -> float | None:
    return next(
        (ph["window"]["per_s"] for ph in result["phases"] if ph["kind"] == "kafka floor"), None
    )


def _of_floor(ph: dict[str, Any], floor: float | None) -> str:
    """`per_s` as a share of the floor's, for the gateway's exact series."""
    per_s = ph["window"]["per_s"]
    if ph["kind"] != "exact" or not floor or not per_s:
        return ""
    return f" ({per_s / floor:.2f} of floor)"


def format_table(result: dict[str, Any]) -> str:
    lines = []
    floor = _floor_per_s(result)
    for ph in result["phases"]:
        seq, win = ph["sequential"], ph["window"]
        verifier = {None: "", True: " (verifier on)", False: " (cosine only)"}[ph["verifier"]]
        start = ph["gateway_start_s"]
        lines.append(
            f"{ph['kind']}{verifier}, {ph['entries']} entries"
            + ("" if start is None else f": gateway start {start} s (restore included)")
        )
        lines.append(
            f"  sequential n={seq['n']}: hit p50/p99 {_pair(seq['hit_ms'])} ms "
            f"({_caches(seq)}; wrong {seq['wrong_answers']})"
        )
        lines.append(
            f"  window {win['window']} n={win['n']}: {win['per_s']} req/s{_of_floor(ph, floor)}, "
            f"hit p50/p99 "
            f"{_pair(win['hit_ms'])} ms ({_caches(win)}; wrong {win['wrong_answers']})"
        )
        lines.append(f"  shard lookup ms p50/p99 {_lookup_ms(ph)}; MiB per shard {_mib(ph)}")
    lines.append(f"took {result['duration_s']} s; {machine_summary(result['machine'])}")
    return "\n".join(lines)


_MD_SECTION = "cache_hit: the hit path end to end at 10k and 100k entries"
_MD_INTRO = """\
Cached questions through broker, gateway (`cache.shards` shards: 2 until 2026-12-02, the
default of 1 since) and back: `QuotaflowClient.ask` publish -> `done` on the reply topic,
streamed, fresh ids. The entries are written to the changelog topic first and restored by
the shards at start (**start s**: gateway start-up, restore included). **exact**: the
stored question again; **semantic**: its paraphrase ("How can I ..." for "How do I ..."),
all entries in one tenant scope, so every lookup searches all of them (brute-force cosine,
then the verifier if its weights are trained; "cosine only" otherwise). **seq**: one at a
time after 30 warm-up requests; **window**: W in flight, throughput = requests / wall
time. **hit p50/p99**: of the requests answered from cache; **served**: how they were
answered (and **wrong**: hits whose text is not the stored answer of that question).
**lookup ms**: the busy shards' own decision time per lookup call (embedding included),
p50 / p99. **MiB**: bytes held per shard. **kafka floor** (from 2026-12-02): the same
load against a bare aiokafka responder with the answers in a dict and no gateway
(`benchmarks/_echo.py`), in the same run; the exact series' req/s is also given as a
share of it."""
_MD_COLUMNS = (
    "date",
    "machine",
    "series",
    "entries",
    "start s",
    "seq hit p50/p99 ms",
    "window",
    "req/s",
    "window hit p50/p99 ms",
    "served (wrong)",
    "lookup ms",
    "MiB/shard",
    "loadavg start -> end",
    "results",
)


def record(result: dict[str, Any], json_path: Path) -> Path:
    """One BENCHMARKS.md row per phase."""
    date = result["started_at"].replace("T", " ")[:16]
    notes = result["notes"]
    md = json_path
    floor = _floor_per_s(result)
    for ph in result["phases"]:
        seq, win = ph["sequential"], ph["window"]
        series = ph["kind"]
        if ph["verifier"] is not None:
            series += " (verifier)" if ph["verifier"] else " (cosine only)"
        md = add_row(
            _MD_SECTION,
            _MD_INTRO,
            _MD_COLUMNS,
            [
                date,
                machine_summary(result["machine"]),
                series,
                str(ph["entries"]),
                "-" if ph["gateway_start_s"] is None else str(ph["gateway_start_s"]),
                _pair(seq["hit_ms"]),
                str(win["window"]),
                f"{win['per_s']}{_of_floor(ph, floor)}",
                _pair(win["hit_ms"]),
                f"{_caches(win)} ({win['wrong_answers'] + seq['wrong_answers']})",
                _lookup_ms(ph),
                _mib(ph),
                f"{notes['loadavg_at_start'][0]:.1f} -> {notes['loadavg_at_end'][0]:.1f}",
                f"`{json_path.relative_to(REPO)}`",
            ],
        )
    return md


def parse_args(argv: Sequence[str] | None = None) -> Params:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cache_hit", description=__doc__)
    ap.add_argument("--sizes", default="10000,100000", help="cached entries, comma-separated")
    ap.add_argument("--n", type=int, default=300, help="sequential requests per phase")
    ap.add_argument("--window", type=int, default=64, help="requests in flight (throughput)")
    ap.add_argument("--window-n", type=int, default=3000, help="requests of the window series")
    ap.add_argument("--no-semantic", action="store_true", help="the exact series only")
    ap.add_argument("--no-floor", action="store_true", help="no bare-responder series")
    ap.add_argument(
        "--shards", type=int, default=CacheConfig().shards, help="cache shards (cache.shards)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, broker data)")
    ap.add_argument("--no-record", action="store_true", help="write neither JSON nor BENCHMARKS.md")
    a = ap.parse_args(argv)
    sizes = tuple(int(s) for s in a.sizes.split(",") if s)
    if not sizes or min(sizes) < 1 or min(a.n, a.window, a.window_n, a.shards) < 1:
        ap.error("--sizes, --n, --window, --window-n and --shards must be >= 1")
    return Params(
        sizes=sizes,
        n=a.n,
        window=a.window,
        window_n=a.window_n,
        semantic=not a.no_semantic,
        floor=not a.no_floor,
        shards=a.shards,
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
