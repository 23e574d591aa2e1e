"""`quotaflow send --file IN.jsonl --out OUT.jsonl`: a whole file of requests, resumable.

At most `window` requests are in flight; each answer frees a slot for the next line at
once (no batches, no barriers). Every result is appended to OUT as one flushed line as it
arrives. If OUT exists, its ids are skipped, so rerunning an interrupted command picks up
where it stopped; lines without an id get one derived from their content, which is the
same on every run (`pipeline._batch_lines` lists the accepted line forms and the id rule,
`pipeline._batch_results` the result line). SIGINT/SIGTERM stop publishing, wait
`grace_s` for what is in flight, write it and exit 130/143 with a summary saying how to
resume; a second signal stops at once.

Exit codes: 0 every line has a `done` result; 1 some result is an error, or the batch
gave up (Kafka failed, or a request got no reply for `timeout_s`); 2 bad options or a
results file that cannot be resumed from; 130/143 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Final, Protocol

import msgspec
from aiokafka.errors import KafkaError

from pipeline._batch_lines import BatchInputError, BatchItem, LineDefaults, read_items
from pipeline._batch_options import BatchOptions, batch_options
from pipeline._batch_progress import LogView, RichView, Tally, View, format_duration
from pipeline._batch_results import (
    DONE,
    BatchResult,
    Recorded,
    input_error,
    open_results,
    result_of,
)
from pipeline.client import Answer, QuotaflowClient
from topics.config import Config, resolve_secret
from topics.wire import Request

__all__ = ["Asker", "BatchOptions", "BatchRun", "Plan", "plan_batch", "send_batch"]

_ENCODER: Final = msgspec.json.Encoder()
_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
_CLIENT_ID: Final = "quotaflow-batch"
# From this long on, the summary also gives the wall time as minutes (or hours).
_MINUTE_S: Final = 60.0


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What a run will do, from the input and what the results file already holds."""

    lines: int
    todo: int
    skipped: int
    # Skipped because their recorded result is an error (they count against exit 0).
    skipped_errors: int


def plan_batch(items: Iterable[BatchItem], recorded: Recorded) -> Plan:
    """Count the lines, and those a resume skips because `recorded` has their result."""
    lines = todo = skipped = skipped_errors = 0
    for item in items:
        lines += 1
        if recorded.has(item):
            skipped += 1
            skipped_errors += recorded.status.get(item.id, DONE) != DONE
        else:
            todo += 1
    return Plan(lines=lines, todo=todo, skipped=skipped, skipped_errors=skipped_errors)


class Asker(Protocol):
    """What a batch run needs of the client: its reply topic and `ask`."""

    @property
    def reply_topic(self) -> str: ...

    async def ask(self, body: Request, *, timeout_s: float | None = None) -> Answer: ...


class BatchRun:
    """The workers, the results file and the stop logic of one batch run."""

    def __init__(
        self, client: Asker, out: IO[bytes], tally: Tally, view: View, opts: BatchOptions
    ) -> None:
        self.client = client
        self.out = out
        self.tally = tally
        self.view = view
        self.opts = opts
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.signal: signal.Signals | None = None
        self.gave_up: str | None = None
        self.in_flight = 0
        self.abandoned = 0

    def write(self, result: BatchResult) -> None:
        self.out.write(_ENCODER.encode(result) + b"\n")
        self.out.flush()
        self.tally.add(result)
        self.view.advance(result)

    def give_up(self, why: str) -> None:
        if self.gave_up is None and self.signal is None:
            self.gave_up = why
            self.view.say(
                f"batch: {why}; stopping: waiting up to {self.opts.grace_s:g} s for "
                f"{self.in_flight} in flight"
            )
        self.stop.set()

    def on_signal(self, sig: signal.Signals) -> None:
        if self.signal is not None or self.gave_up is not None:
            self.hurry.set()
            return
        self.signal = sig
        self.stop.set()
        self.view.say(
            f"batch: {sig.name}: publishing stopped; waiting up to {self.opts.grace_s:g} s "
            f"for {self.in_flight} in flight ({sig.name} again to stop now)"
        )

    async def _one(self, item: BatchItem) -> BatchResult | None:
        """The result of one request, or None when there is none to write."""
        assert item.request is not None
        request = msgspec.structs.replace(item.request, reply_to=self.client.reply_topic)
        try:
            answer = await self.client.ask(request, timeout_s=self.opts.timeout_s)
        except TimeoutError:
            self.give_up(
                f"no reply for {self.opts.timeout_s:g} s to line {item.line} (id {item.id}); "
                "is the gateway running? (--timeout sets the wait)"
            )
            return None
        except KafkaError as exc:
            self.give_up(f"kafka: {exc!r}")
            return None
        return result_of(item, answer)

    async def _worker(self, items: Iterator[BatchItem]) -> None:
        try:
            while not self.stop.is_set():
                item = next(items, None)
                if item is None:
                    return
                if item.request is None:
                    self.write(input_error(item))
                    continue
                self.in_flight += 1
                try:
                    result = await self._one(item)
                finally:
                    self.in_flight -= 1
                if result is not None:
                    self.write(result)
        except Exception as exc:
            self.give_up(f"internal error: {exc!r}")
            raise

    async def execute(self, items: Iterator[BatchItem], workers: int) -> None:
        """Run `workers` workers over `items` until done, or until a stop and its grace."""
        workers = max(1, workers)  # at least one, to find out that `items` is empty
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self.on_signal, sig)
        ticker = asyncio.ensure_future(self.view.run())
        tasks = [asyncio.ensure_future(self._worker(items)) for _ in range(workers)]
        all_done = asyncio.ensure_future(asyncio.wait(tasks))
        stopped = asyncio.ensure_future(self.stop.wait())
        hurried = asyncio.ensure_future(self.hurry.wait())
        try:
            await asyncio.wait({all_done, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not all_done.done():
                await asyncio.wait(
                    {all_done, hurried},
                    timeout=self.opts.grace_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            self.abandoned = self.in_flight
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for fut in (ticker, all_done, stopped, hurried):
                fut.cancel()
            await asyncio.gather(ticker, all_done, stopped, hurried, return_exceptions=True)
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome


def _summary(tally: Tally, plan: Plan, path_out: Path) -> str:
    tokens = tally.prompt_tokens + tally.completion_tokens
    elapsed = tally.elapsed()
    long = f" = {format_duration(elapsed)}" if elapsed >= _MINUTE_S else ""
    return (
        f"batch: {tally.finished} results in {elapsed:.1f} s{long} ({tally.rate():.1f} "
        f"req/s): {tally.by_status()}; tokens {tokens} (prompt "
        f"{tally.prompt_tokens}, completion {tally.completion_tokens}); cost "
        f"${tally.cost_usd:.6f}; skipped {plan.skipped} already done; results in {path_out}"
    )


def _resume_hint(run: BatchRun, tally: Tally, plan: Plan, path_out: Path) -> str:
    unsent = plan.todo - tally.finished - run.abandoned
    return (
        f"batch: {run.abandoned} in flight not answered in time and {max(unsent, 0)} not "
        f"sent; to resume, run the same command again: the {plan.skipped + tally.finished} "
        f"lines with a result in {path_out} are skipped"
    )


def _plan_line(plan: Plan, path_in: Path, path_out: Path, window: int) -> str:
    errors = f" ({plan.skipped_errors} of them with an error)" if plan.skipped_errors else ""
    return (
        f"batch: {plan.lines} lines in {path_in}; skipped {plan.skipped} already done in "
        f"{path_out}{errors}; sending {plan.todo}, at most {window} in flight"
    )


def _prepare(
    path_in: Path, path_out: Path, defaults: LineDefaults
) -> tuple[Recorded, IO[bytes], Plan]:
    """Read what `path_out` holds (opened to append) and plan the run over `path_in`."""
    try:
        path_in.open("rb").close()  # unreadable input: fail before touching the results
    except OSError as exc:
        raise BatchInputError(f"--file: cannot read {str(path_in)!r}: {exc.strerror}") from None
    if path_out.exists() and path_out.samefile(path_in):
        raise BatchInputError(f"--out: {str(path_out)!r} is the --file itself")
    recorded, out = open_results(path_out)
    try:
        return recorded, out, plan_batch(read_items(path_in, defaults), recorded)
    except BaseException:
        out.close()
        raise


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def send_batch(
    config: Config,
    *,
    path_in: Path,
    path_out: Path,
    model: str,
    tenant: str,
    window: int | None = None,
    max_tokens: int | None = None,
    api_key_env: str | None = None,
    grace_s: float | None = None,
    timeout_s: float | None = None,
    progress_interval_s: float | None = None,
    id_prefix: str | None = None,
    progress_bar: bool | None = None,
) -> int:
    """Send every line of `path_in`, append results to `path_out`; the exit code.

    Options left `None` take `BatchOptions`' defaults. `progress_bar`: a rich bar (True),
    periodic lines (False) or a bar only when stderr is a terminal (None).
    """
    opts = batch_options(
        window=window,
        grace_s=grace_s,
        timeout_s=timeout_s,
        progress_interval_s=progress_interval_s,
        id_prefix=id_prefix,
    )
    defaults = LineDefaults(
        model=model, tenant=tenant, max_tokens=max_tokens, id_prefix=opts.id_prefix
    )
    key = resolve_secret(api_key_env, what="--api-key-env") if api_key_env else None
    recorded, out, plan = await asyncio.to_thread(_prepare, path_in, path_out, defaults)
    with out:
        _say(_plan_line(plan, path_in, path_out, opts.window))
        if plan.todo == 0:
            _say(f"batch: nothing to send; results in {path_out}")
            return 1 if plan.skipped_errors else 0
        items = read_items(path_in, defaults)
        pending = (item for item in items if not recorded.has(item))
        async with QuotaflowClient(
            config.kafka.bootstrap_servers,
            requests_topic=config.topics.requests,
            reply_topic=config.topics.responses,
            tenant=tenant,
            api_key=key,
            client_id=_CLIENT_ID,
        ) as client:
            tally = Tally(total=plan.todo)
            use_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
            view: View = RichView(tally) if use_bar else LogView(tally, opts.progress_interval_s)
            run = BatchRun(client, out, tally, view, opts)
            try:
                await run.execute(pending, workers=min(opts.window, plan.todo))
            finally:
                items.close()
                view.close()
                out.flush()
                with contextlib.suppress(OSError):
                    os.fsync(out.fileno())
    _say(_summary(tally, plan, path_out))
    if run.signal is not None or run.gave_up is not None:
        _say(_resume_hint(run, tally, plan, path_out))
        if run.signal is not None:
            return 128 + run.signal.value
        return 1
    return 1 if tally.errors or plan.skipped_errors else 0
