"""`quotaflow demo`: broker, simulator, gateway and sample traffic on one machine.

Everything it starts it stops again, also on Ctrl-C or SIGTERM: the simulator and the
gateway (with Ray) run in this process, so there is one process tree to clean up besides
the broker, which runs in its own session, is stopped last, and is watched by a tiny
watchdog process that stops it should this process die without cleaning up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import ray
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.client import QuotaflowClient
from pipeline.gateway import Gateway
from pipeline.kafka_local import LocalKafka, free_port
from pipeline.runtime import init_ray
from pipeline.simulator import Simulator
from pipeline.stack import sim_config_dict, write_config
from topics.config import Config
from topics.logs import configure_logging
from topics.wire import ChunkReply, CompletionReply, DoneReply, ErrorReply, Reply, ResetReply

__all__ = ["run_demo"]

# -- the demo's knobs -------------------------------------------------------------------

# Where the broker's data, the config and the simulator log go without --home.
DEFAULT_HOME = Path(".quotaflow/demo")
# Per deployment (two of them) and per simulator key: roomy for the sample traffic.
DEMO_LIMITS = {"rpm": 120, "tpm": 40_000}
# Slow enough that tokens visibly stream: ~150 ms to the first token, then 40 ms each.
SIM_PACING = {"ttft_ms": 150, "inter_token_ms": 40, "output_tokens": 24}
# JSON logs at info would drown the live view.
LOG_LEVEL = "warning"
TENANTS = ("shop-eu", "shop-us", "batch")
MODEL = "fast"
# Above SIM_PACING's output_tokens, so answers end with finish_reason "stop".
MAX_TOKENS = 48
# Fewer would leave no room for ordinary traffic next to the special cases.
MIN_REQUESTS = 6
# Every NON_STREAM_EVERY-th ordinary request asks for one completion instead of a stream.
NON_STREAM_EVERY = 4
# Between two sends: concurrent, yet the rows appear one by one.
STAGGER_S = 0.25
# After the FAQ's first answer is done, before asking it again (the cache fills just after).
FAQ_REPEAT_GAP_S = 0.5
# Longest wait for any one reply before the row counts as timed out.
REPLY_TIMEOUT_S = 60.0
# How long `deadline_ms` of the late request lies in the past.
LATE_BY_MS = 5_000
# Live table refreshes per second, and the tail of streamed text it shows.
REFRESH_PER_S = 8
TEXT_TAIL = 60
# Bounds on the clean-up steps and on reading the dead-letter topic.
GATEWAY_STOP_TIMEOUT_S = 20.0
DLQ_TIMEOUT_S = 15.0
# Line width when stdout is not a terminal (logs, CI), so tables stay readable.
PLAIN_WIDTH = 170
# How long the watchdog may take to exit after a normal end.
WATCHDOG_EXIT_TIMEOUT_S = 10.0
# Printed once, when the first token arrives (tests wait for it).
STREAM_MARKER = "tokens are streaming"
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130

PROMPTS = (
    "Where is my parcel? Order 1042 was due yesterday.",
    "Can I change the delivery address of order 2210?",
    "The blender I bought arrives broken. What now?",
    "Do you ship to Norway, and how long does it take?",
    "Please cancel my subscription at the end of the month.",
    "My discount code SPRING24 is rejected at checkout.",
    "Summarise this review: 'Great shoes, run a size small.'",
    "Classify this ticket: 'charged twice for one order'.",
)
FAQ_PROMPT = "What is your return policy?"
# Not JSON at all: the gateway must dead-letter it and carry on.
BROKEN_VALUE = b'{"id": "demo-broken", "request": {"model": "fast", "messages": [ '

Expect = Literal["done", "unknown_model", "deadline_exceeded"]


# -- the plan ---------------------------------------------------------------------------


@dataclass
class Row:
    """One sample request: what is sent, what is expected, what came back so far."""

    id: str
    tenant: str
    body: dict[str, Any]
    label: str
    expect: Expect = "done"
    late: bool = False
    after: Row | None = None  # send only once this row is done (the FAQ repeat)
    status: str = "waiting"
    text: str = ""
    cache: str = ""
    deployment: str = ""
    ttft_ms: float | None = None
    total_ms: float | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ok(self) -> bool:
        return self.status == self.expect


def _body(prompt: str, *, stream: bool, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
        "max_tokens": MAX_TOKENS,
        **extra,
    }


def plan(requests: int, run: str) -> list[Row]:
    """`requests` sample rows: ordinary chats plus a cached FAQ pair, a bad model, a late one."""
    n = max(requests, MIN_REQUESTS)
    ids = (f"{run}-{i:02d}" for i in range(n))
    faq = Row(next(ids), "shop-eu", _body(FAQ_PROMPT, stream=True, temperature=0), "faq")
    specials = [
        faq,
        Row(
            next(ids),
            "shop-us",
            _body(PROMPTS[0], stream=True, model="nope"),
            "bad model",
            expect="unknown_model",
        ),
        Row(
            next(ids),
            "batch",
            _body(PROMPTS[1], stream=False),
            "late",
            expect="deadline_exceeded",
            late=True,
        ),
    ]
    repeat = Row(
        next(ids), "shop-eu", _body(FAQ_PROMPT, stream=True, temperature=0), "faq again", after=faq
    )
    ordinary = []
    for i in range(n - len(specials) - 1):
        stream = i % NON_STREAM_EVERY != NON_STREAM_EVERY - 1
        ordinary.append(
            Row(
                next(ids),
                TENANTS[i % len(TENANTS)],
                _body(PROMPTS[i % len(PROMPTS)], stream=stream),
                "chat" if stream else "completion",
            )
        )
    # Interleave the special cases with the ordinary chats; the repeat waits for the FAQ.
    rows: list[Row] = []
    for i, row in enumerate(ordinary):
        rows.append(row)
        if i < len(specials):
            rows.append(specials[i])
    rows.extend(specials[len(ordinary) :])
    rows.append(repeat)
    return rows


# -- output -----------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def live_table(rows: list[Row]) -> Table:
    """The live view: one line per request, streamed text growing as chunks arrive."""
    table = Table(title="sample traffic", expand=False)
    columns: tuple[tuple[str, dict[str, Any]], ...] = (
        ("id", {}),
        ("tenant", {}),
        ("model", {}),
        ("kind", {}),
        ("status", {}),
        ("text (tail)", {"overflow": "ellipsis", "min_width": 20, "max_width": TEXT_TAIL}),
        ("cache", {}),
        ("deployment", {}),
        ("ttft ms", {"justify": "right"}),
        ("total ms", {"justify": "right"}),
    )
    for name, kw in columns:
        table.add_column(name, no_wrap=True, **kw)
    for r in rows:
        style = {"done": "green", "waiting": "dim"}.get(r.status, "yellow")
        if r.status not in ("done", "waiting", "sent", "streaming", "answered"):
            style = "green" if r.ok else "red"
        table.add_row(
            r.id,
            r.tenant,
            str(r.body["model"]),
            r.label,
            f"[{style}]{r.status}[/]",
            r.text[-TEXT_TAIL:].replace("\n", " "),
            r.cache,
            r.deployment,
            _ms(r.ttft_ms),
            _ms(r.total_ms),
        )
    return table


def summary_table(rows: list[Row]) -> Table:
    """Counts by status, cache hits, tokens, cost and median time to first token."""
    table = Table(title="summary", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    for status, count in sorted(Counter(r.status for r in rows).items()):
        table.add_row(f"status {status}", str(count))
    ttfts = [r.ttft_ms for r in rows if r.ttft_ms is not None]
    table.add_row("cache hits", str(sum(r.cache in ("exact", "semantic") for r in rows)))
    table.add_row("total tokens", str(sum(r.tokens for r in rows)))
    table.add_row("total cost_usd", f"{sum(r.cost_usd for r in rows):.6f}")
    table.add_row("p50 ttft ms", _ms(statistics.median(ttfts)) if ttfts else "-")
    return table


class View:
    """Live table on a terminal; plain event lines (and the tables at the end) otherwise."""

    def __init__(self, console: Console, rows: list[Row]) -> None:
        self.console = console
        self.rows = rows
        self.live = console.is_terminal
        self._streaming_seen = False

    def note(self, text: str) -> None:
        """A line worth reading in both modes (in live mode it scrolls above the table)."""
        self.console.print(text, highlight=False, soft_wrap=True)

    def event(self, text: str) -> None:
        """A per-request line, only when there is no live table to show it."""
        if not self.live:
            self.note(text)

    def chunk(self, row: Row) -> None:
        if not self._streaming_seen:
            self._streaming_seen = True
            self.note(f"[bold]{STREAM_MARKER}[/] (first chunk of {row.id})")

    @contextlib.contextmanager
    def showing(self) -> Iterator[None]:
        if not self.live:
            yield
            return
        with Live(
            console=self.console,
            get_renderable=lambda: live_table(self.rows),
            refresh_per_second=REFRESH_PER_S,
            transient=False,
        ):
            yield


# -- traffic ----------------------------------------------------------------------------


def _content(reply: ChunkReply | CompletionReply) -> str:
    if isinstance(reply, ChunkReply):
        return "".join(
            str((c.get("delta") or {}).get("content") or "")
            for c in reply.chunk.get("choices") or []
        )
    choices = reply.completion.get("choices") or [{}]
    return str((choices[0].get("message") or {}).get("content") or "")


def _apply(row: Row, reply: Reply, view: View) -> None:
    """Fold one reply into its row."""
    if isinstance(reply, ChunkReply):
        row.status = "streaming"
        row.text += _content(reply)
        view.chunk(row)
    elif isinstance(reply, CompletionReply):
        row.status = "answered"
        row.text = _content(reply)
    elif isinstance(reply, ResetReply):
        row.text = ""
    elif isinstance(reply, DoneReply):
        row.status = "done"
        row.cache = reply.cache
        row.deployment = reply.deployment or ("(cache)" if reply.cache != "miss" else "")
        row.ttft_ms = reply.timing.ttft_ms
        row.total_ms = reply.timing.total_ms
        row.tokens = reply.usage.total_tokens
        row.cost_usd = reply.cost_usd
        view.event(
            f"  done   {row.id} {row.tenant:8} cache={row.cache:5} deployment={row.deployment} "
            f"ttft={_ms(row.ttft_ms)}ms total={_ms(row.total_ms)}ms tokens={row.tokens}: "
            f"{row.text[-TEXT_TAIL:]!r}"
        )
    elif isinstance(reply, ErrorReply):
        row.status = reply.error.code
        row.text = reply.error.message
        view.event(f"  error  {row.id} {row.tenant:8} {reply.error.code}: {reply.error.message}")


async def _one(client: QuotaflowClient, row: Row, delay_s: float, view: View) -> None:
    """Send one row's request after its stagger delay and follow its replies to the end."""
    try:
        await asyncio.sleep(delay_s)
        if row.after is not None:
            await row.after.finished.wait()
            await asyncio.sleep(FAQ_REPEAT_GAP_S)
        deadline = int(time.time() * 1000) - LATE_BY_MS if row.late else None
        request = client.build(row.body, id=row.id, tenant=row.tenant, deadline_ms=deadline)
        row.status = "sent"
        view.event(f"  sent   {row.id} {row.tenant:8} {row.label}")
        async for reply in client.stream(request, timeout_s=REPLY_TIMEOUT_S):
            _apply(row, reply, view)
    except TimeoutError:
        row.status = "timeout"
        view.event(f"  timeout {row.id}: no reply for {REPLY_TIMEOUT_S:.0f}s")
    finally:
        row.finished.set()


async def _send_broken(bootstrap: str, topic: str, key: bytes, delay_s: float, view: View) -> None:
    """Produce a value that is not a Request at all, straight to the requests topic."""
    await asyncio.sleep(delay_s)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id="quotaflow-demo-raw")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=BROKEN_VALUE, key=key)
    finally:
        await producer.stop()
    view.note(f"sent one broken message (key {key.decode()}) to {topic}: it must go to the DLQ")


async def _dead_letter(bootstrap: str, topic: str, key: bytes) -> str | None:
    """The `error` header of our broken message on the dead-letter topic (None: not found)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        client_id="quotaflow-demo-dlq",
    )
    await consumer.start()
    try:
        give_up = time.monotonic() + DLQ_TIMEOUT_S
        while time.monotonic() < give_up:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for rec in records:
                    if rec.key == key:
                        headers: dict[str, bytes] = dict(rec.headers)
                        return headers.get("error", b"").decode(errors="replace")
        return None
    finally:
        await consumer.stop()


# -- the stack --------------------------------------------------------------------------


@dataclass
class Stack:
    """What the demo started in this process, for clean-up in reverse order."""

    sim: Simulator | None = None
    ray_started: bool = False
    gateway: Gateway | None = None
    run_task: asyncio.Task[None] | None = None

    async def close(self, note: Callable[[str], None]) -> None:
        """Stop gateway, Ray, simulator; each step runs even when an earlier one failed."""
        if self.gateway is not None:
            self.gateway.stop()
            if self.run_task is not None:
                try:
                    await asyncio.wait_for(self.run_task, GATEWAY_STOP_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
                    note(f"gateway did not drain cleanly: {exc!r}")
            with _reported(note, "closing the gateway"):
                await self.gateway.close()
        if self.ray_started:
            with _reported(note, "stopping Ray"):
                ray.shutdown()  # here, in the main thread: it stops raylet and workers
        if self.sim is not None:
            with _reported(note, "stopping the simulator"):
                await self.sim.stop()


@contextlib.contextmanager
def _reported(note: Callable[[str], None], what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - clean-up goes on
        note(f"[red]{what} failed: {exc!r}[/]")


@contextlib.contextmanager
def _ray_leaves_signals_alone() -> Iterator[None]:
    """Keep Ray from installing its SIGTERM handlers while it starts.

    Theirs `sys.exit()` in the middle of `ray.init`, which orphans Ray's agent processes;
    with ours in place the loop defers the signal until init returns, and then clean-up
    stops a fully started Ray.
    """
    utils = getattr(ray, "_private", None) and getattr(ray._private, "utils", None)
    original = getattr(utils, "set_sigterm_handler", None)
    if original is None:  # another Ray version: nothing to hold back
        yield
        return
    setattr(utils, "set_sigterm_handler", lambda handler: None)  # noqa: B010 - private API
    try:
        yield
    finally:
        setattr(utils, "set_sigterm_handler", original)  # noqa: B010


def _ray_session() -> str | None:
    """Name of the local Ray session (raylet and GCS carry it on their command lines)."""
    node = getattr(ray._private.worker, "_global_node", None)  # private API: best effort
    name = getattr(node, "session_name", None)
    return str(name) if name else None


async def _start(stack: Stack, config: Config, view: View) -> None:
    """Simulator, Ray, gateway: all in this process."""
    assert config.simulator is not None
    stack.sim = Simulator(config.simulator)
    url = await stack.sim.start()
    view.note(f"simulator (OpenAI-compatible, two keys) on {url}")
    view.note("starting Ray and the gateway's actors (takes a few seconds) ...")
    stack.ray_started = True
    with _ray_leaves_signals_alone():
        init_ray(config)
    session = _ray_session()
    if session:
        view.note(f"ray session: {session}")
    stack.gateway = Gateway(config)
    await stack.gateway.start()
    stack.run_task = asyncio.create_task(stack.gateway.run())
    view.note("gateway running")


async def _traffic(config: Config, rows: list[Row], run: str, view: View) -> str | None:
    """Send the sample requests concurrently, follow them; return the DLQ error header."""
    bootstrap = config.kafka.bootstrap_servers
    topics = config.topics
    broken_key = f"{run}-broken".encode()
    async with QuotaflowClient(
        bootstrap,
        requests_topic=topics.requests,
        reply_topic=topics.responses,
        client_id="quotaflow-demo",
    ) as client:
        view.note(
            f"sending {len(rows)} requests from {len(TENANTS)} tenants "
            f"({', '.join(TENANTS)}) plus one broken message"
        )
        with view.showing():
            await asyncio.gather(
                _send_broken(
                    bootstrap, topics.requests, broken_key, STAGGER_S * len(rows) / 2, view
                ),
                *(_one(client, r, i * STAGGER_S, view) for i, r in enumerate(rows)),
            )
    return await _dead_letter(bootstrap, topics.dlq, broken_key)


def _report(rows: list[Row], dlq_error: str | None, view: View) -> bool:
    """The final tables and verdict; True when every request ended as expected."""
    console = view.console
    if not view.live:
        console.print(live_table(rows))
    console.print(summary_table(rows))
    if dlq_error is None:
        view.note("[red]the broken message did not show up on the dead-letter topic[/]")
    else:
        view.note(f"dead-lettered broken message, header error = {dlq_error!r}")
        view.note("... and the gateway kept answering the requests sent after it")
    wrong = [r for r in rows if not r.ok]
    counts = ", ".join(f"{s} {c}" for s, c in sorted(Counter(r.status for r in rows).items()))
    if wrong or dlq_error is None:
        for r in wrong:
            view.note(f"[red]{r.id}: expected {r.expect}, got {r.status}[/]")
        view.note(f"[red]FAILED[/]: {len(rows) - len(wrong)}/{len(rows)} as expected ({counts})")
        return False
    view.note(f"[green]OK[/]: {len(rows)}/{len(rows)} requests answered as expected ({counts})")
    return True


# -- signals and the whole run ----------------------------------------------------------


def _ignore_signals() -> None:
    """From here on clean-up must finish: a second Ctrl-C or a SIGTERM is ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


async def _demo(kafka_addr: str, home: Path, requests: int, view: View) -> int:
    """Config, in-process stack, traffic and report; clean-up in `finally` on any exit."""
    loop = asyncio.get_running_loop()
    stack = Stack()
    run = uuid.uuid4().hex[:4]
    rows = plan(requests, run)
    view.rows = rows
    interrupted = False
    cleaning = False
    body: asyncio.Task[int] | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal interrupted
        if cleaning or interrupted:
            view.note(f"{sig.name} again: still cleaning up, please wait")
            return
        interrupted = True
        view.note(f"{sig.name}: stopping the demo and everything it started ...")
        if body is not None:
            body.cancel()

    def install_handlers() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)

    async def main() -> int:
        config_path = home / "demo.yaml"
        raw = sim_config_dict(
            bootstrap=kafka_addr,
            sim_port=free_port(),
            sim_log=home / "sim.jsonl",
            limits=DEMO_LIMITS,
            sim=SIM_PACING,
            extra={"logging": {"level": LOG_LEVEL}},
        )
        config = write_config(raw, config_path)
        configure_logging(config.logging)
        view.note(f"config: {config_path}")
        view.note(
            f"  while the demo runs, try: quotaflow send --config {config_path} --model {MODEL} "
            '"hello"'
        )
        await _start(stack, config, view)
        install_handlers()  # again: Ray's core worker installs its own SIGTERM handler
        dlq_error = await _traffic(config, rows, run, view)
        return EXIT_OK if _report(rows, dlq_error, view) else EXIT_FAILED

    install_handlers()
    body = asyncio.create_task(main())
    try:
        return await body
    except asyncio.CancelledError:
        if not interrupted:
            raise
        return EXIT_INTERRUPTED
    finally:
        cleaning = True
        view.note("stopping gateway, Ray and simulator ...")
        await stack.close(view.note)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        _ignore_signals()


# Waits for EOF on stdin, i.e. for the demo to exit however it ends (even SIGKILL or an
# abort inside Ray), then stops the demo's broker (a no-op when the demo already did).
_WATCHDOG = """
import pathlib, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.buffer.read()
from pipeline.kafka_local import LocalKafka
LocalKafka(pathlib.Path(sys.argv[1])).down()
"""


def _start_watchdog(home: Path) -> subprocess.Popen[bytes]:
    """A small process that stops the broker if this one dies without cleaning up."""
    root = str(Path(__file__).resolve().parent.parent)  # where `pipeline` can be imported
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(home)],
        stdin=subprocess.PIPE,  # close-on-exec here: only this process holds the write end
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the terminal's group must not stop it early
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        },
    )


def _stop_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    """Let the watchdog see EOF and exit (the broker is already down by now)."""
    assert watchdog.stdin is not None
    watchdog.stdin.close()
    try:
        watchdog.wait(WATCHDOG_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(*, requests: int = 24, home: Path | None = None) -> int:
    """Run the whole demo; 0 when every request ended as expected, 1 if not, 130 on a signal."""
    console = Console(width=None if sys.stdout.isatty() else PLAIN_WIDTH)
    home = (home or DEFAULT_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    kafka = LocalKafka(home)
    view = View(console, [])
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Outside the event loop (broker start) both interrupt, so `finally` stops the broker.
    for sig in saved:
        signal.signal(sig, _raise_interrupt)
    started = time.monotonic()
    watchdog = _start_watchdog(home)
    try:
        view.note(f"[bold]quotaflow demo[/] (state in {home})")
        view.note("starting a local Kafka broker ...")
        addr = kafka.up(port=0)
        view.note(f"Kafka broker on {addr}")
        return asyncio.run(_demo(addr, home, requests, view))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        _ignore_signals()
        view.note("stopping the Kafka broker ...")
        try:
            kafka.down()
        finally:
            _stop_watchdog(watchdog)
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)
        view.note(f"demo finished in {time.monotonic() - started:.1f}s; nothing left running")
