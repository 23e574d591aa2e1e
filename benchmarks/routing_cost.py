"""Cost of a mixed workload: `model: "auto"` (routing rules) vs always the flagship.

One run starts a local broker, the simulator (`quotaflow sim`) and the gateway
(`quotaflow run`) with three priced models, each one deployment on the simulator:

* `small`, `mid`, `flagship` at the list prices of gpt-4.1-nano, gpt-4.1-mini and
  gpt-4.1 (USD per Mtok in/out: 0.10/0.40, 0.40/1.60, 2.00/8.00; the JSON records them);
* `routing`: premium tier -> flagship; task `code` -> mid; task `reasoning` -> flagship;
  complexity score >= 0.4 -> flagship; >= 0.2 -> mid; otherwise `small` (the default);
  the complexity score uses the default features and weights.

The workload (`workload()`, seeded, written for this benchmark) mixes three kinds of
prompts: **faq** (short customer-service questions, `max_tokens` 150), **code** (write,
fix or refactor code, some with a code block; 600) and **reasoning** (maths word problems,
proofs, design trade-offs; 1200). A share of code and reasoning prompts carry the matching
`task` hint, a few requests of any kind `tier` premium or economy; the rest rely on the
score. The simulator answers with exactly `max_tokens` tokens (its `output_tokens` is
above every `max_tokens`), so output length follows the kind of prompt, as real answers
roughly do. The same requests run twice, `auto` then `flagship` (model named), cache off;
cost is the sum of `done.cost_usd` (the gateway's price table applied to the simulator's
usage). Nothing here judges answer quality: **kind -> model** shows where each kind went.

    .venv/bin/python -m benchmarks.routing_cost [--n 400] [--window 32] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
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
from pipeline.stack import SIM_KEY_ENVS, GatewayProcess, sim_config_dict, write_config
from topics.wire import DoneReply

__all__ = ["Params", "Prompt", "format_table", "main", "run", "workload"]

NAME = "routing_cost"
KINDS = ("faq", "code", "reasoning")
MODELS = ("small", "mid", "flagship")
# model -> (upstream model name at the simulator, input USD/Mtok, output USD/Mtok)
PRICES: dict[str, tuple[str, float, float]] = {
    "small": ("gpt-4.1-nano", 0.10, 0.40),
    "mid": ("gpt-4.1-mini", 0.40, 1.60),
    "flagship": ("gpt-4.1", 2.00, 8.00),
}
ROUTING: dict[str, Any] = {
    "default_model": "small",
    "rules": [
        {"tier": "premium", "model": "flagship"},
        {"task": "code", "model": "mid"},
        {"task": "reasoning", "model": "flagship"},
        {"min_score": 0.4, "model": "flagship"},
        {"min_score": 0.2, "model": "mid"},
    ],
}
MAX_TOKENS = {"faq": 150, "code": 600, "reasoning": 1200}
SHARES = {"faq": 0.6, "code": 0.25, "reasoning": 0.15}
# Limits far above what the benchmark sends: nothing waits for quota.
LIMITS = {"rpm": 100_000, "tpm": 1_000_000_000}
ANSWER_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Params:
    n: int = 400
    window: int = 32
    seed: int = 7
    keep: bool = False
    record: bool = True


@dataclass(frozen=True)
class Prompt:
    """One request of the workload."""

    kind: str
    text: str
    max_tokens: int
    task: str | None = None
    tier: str | None = None


# -- the workload -------------------------------------------------------------------------

_DAYS = ("Sunday", "Monday", "Easter Monday", "public holidays", "Christmas Eve")
_THINGS = ("parcel", "order", "subscription", "gift card", "jacket", "coffee machine")
_ACTIONS = ("return", "cancel", "track", "pause", "exchange", "upgrade")
_PLACES = ("Norway", "Canada", "the Canary Islands", "Switzerland", "Japan")
_FAQ = (
    "What are your opening hours on {day}?",
    "How do I {action} my {thing}?",
    "Can I {action} my {thing} after it has shipped?",
    "Do you ship to {place}, and how long does it take?",
    "What is your return policy for a {thing}?",
    "I forgot my password. How can I reset it?",
    "Is there a discount for students on the {thing}?",
    "Where can I find the invoice for my last {thing}?",
    "My {thing} arrived damaged. What should I do?",
    "Which payment methods do you accept in {place}?",
)
_LANGS = ("Python", "TypeScript", "Go", "Rust", "Java", "SQL")
_CODE_TASKS = (
    "parses an ISO 8601 date string and returns the weekday",
    "deduplicates a list of orders by customer id, keeping the newest",
    "retries an HTTP call with exponential backoff and jitter",
    "validates an IBAN and explains which check failed",
    "merges two sorted arrays without extra allocations",
)
_SNIPPETS = (
    "def total(items):\n    return sum(i['price'] * i['qty'] for i in items)\n\nprint(total(None))",
    "function last(xs) {\n  return xs[xs.length];\n}\nconsole.log(last([1, 2, 3]));",
    "SELECT customer_id, COUNT(*) FROM orders WHERE created_at > NOW() GROUP BY 1;",
    "for i in range(len(rows)):\n    if rows[i] == None:\n        rows.remove(rows[i])",
)
_CODE = (
    "Write a {lang} function that {task}. Include unit tests.",
    "Why does this raise an exception?\n```\n{snippet}\n```\nFix it and explain the bug.",
    "Refactor this {lang} code for readability and speed:\n```\n{snippet}\n```",
    "Review this snippet and point out edge cases it misses:\n```\n{snippet}\n```",
)
_REASONING = (
    "A tank fills at {a} L/min and drains at {b} L/min; it holds {c} L. Starting empty with "
    "both valves open, how long until it is full? Solve it step by step and explain why the "
    "drain rate matters.",
    "Prove that the sum of the first {a} odd numbers is {a}^2, then generalise the proof.",
    "A shop sells {a} items a day at 20 euros with a margin of {b}%. Should it cut the price "
    "by 10% if sales rise by {c}%? Compare both options step by step and justify the answer.",
    "How many ways can {a} people sit at a round table if two of them refuse to sit together? "
    "Derive the formula first, then evaluate it.",
    "Compare the trade-offs of event sourcing and a CRUD schema for an order system with "
    "{a} writes per second, then design a migration plan in detail.",
    "Find all integer solutions of x^2 - {a}y^2 = 1 with x < {c}, and explain the method.",
)


def workload(n: int, seed: int) -> list[Prompt]:
    """`n` requests, kinds drawn with `SHARES`, shuffled; deterministic for a seed."""
    rng = random.Random(seed)
    out: list[Prompt] = []
    for i in range(n):
        kind = rng.choices(KINDS, weights=[SHARES[k] for k in KINDS])[0]
        if kind == "faq":
            text = rng.choice(_FAQ).format(
                day=rng.choice(_DAYS),
                action=rng.choice(_ACTIONS),
                thing=rng.choice(_THINGS),
                place=rng.choice(_PLACES),
            )
            task = None
        elif kind == "code":
            text = rng.choice(_CODE).format(
                lang=rng.choice(_LANGS), task=rng.choice(_CODE_TASKS), snippet=rng.choice(_SNIPPETS)
            )
            task = "code" if rng.random() < 0.5 else None
        else:
            text = rng.choice(_REASONING).format(
                a=rng.randint(3, 40), b=rng.randint(5, 60), c=rng.randint(100, 900)
            )
            task = "reasoning" if rng.random() < 1 / 3 else None
        roll = rng.random()
        tier = "premium" if roll < 0.05 else ("economy" if roll < 0.1 else None)
        # A request number keeps every prompt distinct (no two requests are the same).
        out.append(Prompt(kind, f"{text} (ticket {i})", MAX_TOKENS[kind], task, tier))
    return out


# -- running it ---------------------------------------------------------------------------


@dataclass
class Phase:
    """One pass over the workload."""

    name: str
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0
    by_model: Counter[str] = field(default_factory=Counter)
    by_kind_model: dict[str, Counter[str]] = field(default_factory=dict)
    cost_by_model: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_ms: list[float] = field(default_factory=list)


async def _phase(client: QuotaflowClient, prompts: list[Prompt], model: str, p: Params) -> Phase:
    out = Phase(model)
    gate = asyncio.Semaphore(p.window)

    async def one(pr: Prompt) -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": pr.text}],
            "max_tokens": pr.max_tokens,
            "stream": False,
        }
        async with gate:
            answer = await client.ask(body, tier=pr.tier, task=pr.task, timeout_s=ANSWER_TIMEOUT_S)
        t = answer.terminal
        if not isinstance(t, DoneReply):
            out.errors[t.error.code] += 1
            return
        out.cost_usd += t.cost_usd
        out.cost_by_model[t.model] = out.cost_by_model.get(t.model, 0.0) + t.cost_usd
        out.by_model[t.model] += 1
        out.by_kind_model.setdefault(pr.kind, Counter())[t.model] += 1
        out.prompt_tokens += t.usage.prompt_tokens
        out.completion_tokens += t.usage.completion_tokens
        out.total_ms.append(t.timing.total_ms)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(pr) for pr in prompts))
    out.seconds = round(time.perf_counter() - t0, 1)
    return out


def _config(bootstrap: str, work: Path) -> dict[str, Any]:
    raw = sim_config_dict(
        bootstrap=bootstrap,
        sim_port=free_port(),
        sim_log=work / "sim.jsonl",
        limits=LIMITS,
        sim={
            "ttft_ms": 5,
            "inter_token_ms": 0,
            "output_tokens": max(MAX_TOKENS.values()) + 1,
        },
        gateway={"max_in_flight": 200},
    )
    base = raw["deployments"][0]["base_url"]
    raw["deployments"] = [
        {
            "name": f"{model}-1",
            "base_url": base,
            "api_key_env": SIM_KEY_ENVS[i % len(SIM_KEY_ENVS)],
            "model": upstream,
            "limits": LIMITS,
            "price": {"input_per_mtok": inp, "output_per_mtok": out},
        }
        for i, (model, (upstream, inp, out)) in enumerate(PRICES.items())
    ]
    raw["models"] = [{"name": m, "deployments": [f"{m}-1"]} for m in PRICES]
    raw["routing"] = ROUTING
    # Each phase sends the same prompts: no answer may come from the cache.
    raw["cache"] = {"enabled": False}
    return raw


async def _measure(
    p: Params, prompts: list[Prompt], work: Path, notes: dict[str, Any]
) -> list[Phase]:
    kafka = LocalKafka(home=work / "home")
    sim_proc: subprocess.Popen[bytes] | None = None
    gateway: GatewayProcess | None = None
    try:
        bootstrap = await asyncio.to_thread(kafka.up, 0)
        config_path = work / "quotaflow.yaml"
        write_config(_config(bootstrap, work), config_path)
        sim_log = work / "sim.out"
        sim_proc = start_simulator(config_path, sim_log)
        await asyncio.to_thread(wait_line, sim_log, b"simulator listening on", sim_proc, 60.0)
        gateway = GatewayProcess(config_path, work / "gateway.log")
        await gateway.start()
        assert gateway.proc is not None
        notes["gateway_pid"] = gateway.proc.pid
        async with QuotaflowClient(bootstrap, client_id="bench-routing") as client:
            return [
                await _phase(client, prompts, "auto", p),
                await _phase(client, prompts, "flagship", p),
            ]
    finally:
        if gateway is not None:
            notes["gateway_exit"] = await gateway.stop()
        if sim_proc is not None:
            await asyncio.to_thread(stop_proc, sim_proc)
        await asyncio.to_thread(kafka.down)


def _summarise(ph: Phase, n: int) -> dict[str, Any]:
    done = sum(ph.by_model.values())
    return {
        "requests": n,
        "done": done,
        "errors": dict(ph.errors),
        "seconds": ph.seconds,
        "cost_usd": round(ph.cost_usd, 8),
        "cost_per_1k_usd": round(ph.cost_usd / n * 1000, 6),
        "share_by_model": {m: round(ph.by_model[m] / n, 4) for m in MODELS},
        "requests_by_model": {m: ph.by_model[m] for m in MODELS},
        "cost_by_model_usd": {m: round(ph.cost_by_model.get(m, 0.0), 8) for m in MODELS},
        "kind_to_model": {
            k: {m: ph.by_kind_model.get(k, Counter())[m] for m in MODELS} for k in KINDS
        },
        "prompt_tokens": ph.prompt_tokens,
        "completion_tokens": ph.completion_tokens,
        "gateway_total_ms": percentiles(ph.total_ms),
    }


async def run(p: Params) -> dict[str, Any]:
    """The whole benchmark; returns what goes to the results JSON."""
    started = datetime.now()
    t0 = time.perf_counter()
    prompts = workload(p.n, p.seed)
    with bench_work("routing", keep=p.keep) as (work, notes, left):
        phases = await _measure(p, prompts, work, notes)
    series = {ph.name: _summarise(ph, p.n) for ph in phases}
    auto, flag = series["auto"], series["flagship"]
    return {
        "benchmark": NAME,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "params": {
            "n": p.n,
            "window": p.window,
            "seed": p.seed,
            "prices_per_mtok": {
                m: {"upstream": u, "in": i, "out": o} for m, (u, i, o) in PRICES.items()
            },
            "routing": ROUTING,
            "max_tokens": MAX_TOKENS,
            "shares": SHARES,
        },
        "workload": {
            "by_kind": dict(Counter(pr.kind for pr in prompts)),
            "task_hints": dict(Counter(pr.task for pr in prompts if pr.task)),
            "tier_hints": dict(Counter(pr.tier for pr in prompts if pr.tier)),
            "examples": {k: next(pr.text for pr in prompts if pr.kind == k) for k in KINDS},
        },
        "notes": notes,
        "leftover_processes": left,
        "series": series,
        "flagship_over_auto": round(flag["cost_usd"] / auto["cost_usd"], 2)
        if auto["cost_usd"]
        else None,
    }


# -- reporting ----------------------------------------------------------------------------


def _shares(s: dict[str, Any]) -> str:
    return " / ".join(f"{s['share_by_model'][m] * 100:.0f}%" for m in MODELS)


def _kind_share(s: dict[str, Any], kind: str, model: str) -> str:
    row = s["kind_to_model"][kind]
    total = sum(row.values())
    return f"{row[model] / total * 100:.0f}%" if total else "-"


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'phase':<10}{'done':>6}{'errors':>8}{'$/1k req':>12}{'small/mid/flagship':>22}{'s':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, s in result["series"].items():
        lines.append(
            f"{name:<10}{s['done']:>6}{sum(s['errors'].values()):>8}"
            f"{s['cost_per_1k_usd']:>12.4f}{_shares(s):>22}{s['seconds']:>8}"
        )
    auto = result["series"]["auto"]
    lines.append("")
    lines.append("auto, kind -> model (small / mid / flagship):")
    for kind in KINDS:
        row = auto["kind_to_model"][kind]
        lines.append(f"  {kind:<10}" + " / ".join(str(row[m]) for m in MODELS))
    lines.append(f"flagship costs {result['flagship_over_auto']}x auto")
    lines.append(f"took {result['duration_s']} s; {machine_summary(result['machine'])}")
    return "\n".join(lines)


_MD_SECTION = "routing_cost: `auto` vs always the flagship"
_MD_INTRO = """\
A mixed workload, the same requests twice through `quotaflow run` (simulator upstream,
limits far above the load, cache off): **auto** (`model: "auto"`, the benchmark's
`routing` rules) and **flagship** (`model: "flagship"` named). Models at gpt-4.1-nano /
gpt-4.1-mini / gpt-4.1 list prices (0.10/0.40, 0.40/1.60, 2.00/8.00 USD per Mtok in/out).
Workload (`benchmarks/routing_cost.py`, seeded): 60% **faq** (short customer questions,
`max_tokens` 150), 25% **code** (write/fix/refactor, some with a code block; 600; half
with `task: code`), 15% **reasoning** (maths word problems, proofs, design trade-offs;
1200; a third with `task: reasoning`), 5% `tier: premium` and 5% `tier: economy` of any
kind; the simulator answers exactly `max_tokens` tokens. Rules: premium -> flagship,
task code -> mid, task reasoning -> flagship, score >= 0.4 -> flagship, >= 0.2 -> mid,
else small. **$/1k** = sum of `done.cost_usd` per 1,000 requests; **share** = requests
per model (small / mid / flagship); **faq->small**, **code->mid**, **reasoning->flagship**:
share of that kind that auto sent there (answer quality is not measured)."""
_MD_COLUMNS = (
    "date",
    "machine",
    "N",
    "auto $/1k",
    "flagship $/1k",
    "flagship / auto",
    "auto share small/mid/flagship",
    "faq->small",
    "code->mid",
    "reasoning->flagship",
    "errors auto/flagship",
    "results",
)


def record(result: dict[str, Any], json_path: Path) -> Path:
    """One BENCHMARKS.md row per run."""
    date = result["started_at"].replace("T", " ")[:16]
    auto, flag = result["series"]["auto"], result["series"]["flagship"]
    return add_row(
        _MD_SECTION,
        _MD_INTRO,
        _MD_COLUMNS,
        [
            date,
            machine_summary(result["machine"]),
            str(result["params"]["n"]),
            f"{auto['cost_per_1k_usd']:.4f}",
            f"{flag['cost_per_1k_usd']:.4f}",
            f"{result['flagship_over_auto']}x",
            _shares(auto),
            _kind_share(auto, "faq", "small"),
            _kind_share(auto, "code", "mid"),
            _kind_share(auto, "reasoning", "flagship"),
            f"{sum(auto['errors'].values())} / {sum(flag['errors'].values())}",
            f"`{json_path.relative_to(REPO)}`",
        ],
    )


def parse_args(argv: Sequence[str] | None = None) -> Params:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.routing_cost", description=__doc__)
    ap.add_argument("--n", type=int, default=400, help="requests per phase")
    ap.add_argument("--window", type=int, default=32, help="requests outstanding at a time")
    ap.add_argument("--seed", type=int, default=7, help="workload seed")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, broker data)")
    ap.add_argument("--no-record", action="store_true", help="write neither JSON nor BENCHMARKS.md")
    a = ap.parse_args(argv)
    if a.n < 1 or a.window < 1:
        ap.error("--n and --window must be >= 1")
    return Params(n=a.n, window=a.window, seed=a.seed, keep=a.keep, record=not a.no_record)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parse_args(argv)
    result = asyncio.run(run(p))
    publish(NAME, result, format_table(result), record if p.record else None)
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
