"""Batch mode (`quotaflow send --file`): line parsing, ids, resume bookkeeping; end to end.

The unit tests need nothing running; the integration tests run the real CLI as a child
process against the session's broker, gateway and simulator.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pipeline._batch_lines import (
    ID_DIGEST_CHARS,
    BatchInputError,
    BatchItem,
    LineDefaults,
    iter_items,
)
from pipeline._batch_options import batch_options
from pipeline._batch_progress import LogView, Tally, format_duration, progress_line
from pipeline._batch_results import (
    DONE,
    INVALID_INPUT,
    BatchOutputError,
    BatchResult,
    input_error,
    open_results,
    result_of,
    scan_results,
)
from pipeline.batch import BatchRun, plan_batch
from pipeline.cli import main
from pipeline.client import Answer
from pipeline.simulator import completion_tokens_for, expected_text
from tests.conftest import Stack
from topics.wire import DoneReply, ErrorBody, ErrorReply, Request, Timing, TokenUsage

DEFAULTS = LineDefaults(model="fast")


def _items(*lines: str | bytes, defaults: LineDefaults = DEFAULTS) -> list[BatchItem]:
    raw = [ln if isinstance(ln, bytes) else ln.encode() for ln in lines]
    return list(iter_items(raw, defaults))


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj)


# -- input lines ------------------------------------------------------------------------

USER_HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("obj", "body", "envelope"),
    [
        ({"prompt": "hi"}, {"model": "fast", "messages": USER_HI}, {}),
        (
            {"prompt": "hi", "system": "be brief", "model": "big", "max_tokens": 5},
            {
                "model": "big",
                "max_tokens": 5,
                "messages": [{"role": "system", "content": "be brief"}, *USER_HI],
            },
            {},
        ),
        (
            {"prompt": "hi", "tenant": "t1", "priority": 2, "metadata": {"k": 1}},
            {"model": "fast", "messages": USER_HI},
            {"tenant": "t1", "priority": 2, "metadata": {"k": 1}},
        ),
        (
            {"request": {"messages": USER_HI, "temperature": 0}, "priority": 0, "cache": "exact"},
            {"model": "fast", "messages": USER_HI, "temperature": 0},
            {"priority": 0, "cache": "exact"},
        ),
        (
            {"messages": USER_HI, "model": "m", "stream": True, "metadata": {"x": "y"}},
            {"model": "m", "messages": USER_HI, "stream": True, "metadata": {"x": "y"}},
            {},
        ),
        (
            {
                "custom_id": "c1",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": USER_HI},
            },
            {"model": "fast", "messages": USER_HI},
            {},
        ),
    ],
)
def test_every_accepted_form_becomes_its_request(
    obj: dict[str, Any], body: dict[str, Any], envelope: dict[str, Any]
) -> None:
    (item,) = _items(_line(obj))
    assert item.error is None
    assert item.request is not None
    assert item.request.request == body
    for field, value in envelope.items():
        assert getattr(item.request, field) == value
    assert item.request.tenant == envelope.get("tenant", DEFAULTS.tenant)
    assert item.request.reply_to is None  # the batch sets its own when it sends


def test_command_line_defaults_fill_only_what_a_line_leaves_out() -> None:
    d = LineDefaults(model="fast", tenant="night", max_tokens=7)
    own, given, completion = _items(
        _line({"prompt": "a", "model": "big", "max_tokens": 3, "tenant": "day"}),
        _line({"prompt": "b"}),
        _line({"messages": USER_HI, "max_completion_tokens": 9}),
        defaults=d,
    )
    assert own.request is not None
    assert given.request is not None
    assert completion.request is not None
    assert (own.request.request["model"], own.request.request["max_tokens"]) == ("big", 3)
    assert own.request.tenant == "day"
    assert (given.request.request["model"], given.request.request["max_tokens"]) == ("fast", 7)
    assert given.request.tenant == "night"
    assert "max_tokens" not in completion.request.request


def test_own_ids_are_kept() -> None:
    a, b = _items(
        _line({"id": "ticket-1", "prompt": "x"}),
        _line({"custom_id": "req-9", "body": {"messages": USER_HI}}),
    )
    assert (a.id, b.id) == ("ticket-1", "req-9")
    assert a.request is not None
    assert a.request.id == "ticket-1"


def test_derived_ids_are_the_same_on_every_run_and_do_not_move_with_other_lines() -> None:
    lines = [_line({"prompt": f"question {i}"}) for i in range(5)]
    first = [it.id for it in _items(*lines)]
    assert first == [it.id for it in _items(*lines)]
    assert len(set(first)) == len(lines)
    assert all(len(i) == ID_DIGEST_CHARS for i in first)
    # A line added in front, a blank line between: the others keep their ids.
    moved = _items(_line({"prompt": "new one"}), "", *lines)
    assert [it.id for it in moved[1:]] == first
    assert [it.line for it in moved[1:]] == list(range(3, 3 + len(lines)))
    # The same request spelt differently (key order, spacing) is the same request ...
    assert _items('{ "prompt":"question 0" }')[0].id == first[0]
    # ... and the request carries its id.
    assert all(it.request is not None and it.request.id == it.id for it in moved)


def test_repeats_of_one_request_get_distinct_ids() -> None:
    items = _items(*[_line({"prompt": "same"})] * 3)
    ids = [it.id for it in items]
    assert len(set(ids)) == 3
    assert ids[1] == ids[0] + ".1"
    assert ids[2] == ids[0] + ".2"
    assert all(it.error is None for it in items)


@pytest.mark.parametrize(
    "defaults",
    [
        LineDefaults(model="fast", tenant="other"),
        LineDefaults(model="big"),
        LineDefaults(model="fast", max_tokens=5),
        LineDefaults(model="fast", id_prefix="2026-11-22/"),
    ],
)
def test_derived_ids_change_with_what_the_request_is(defaults: LineDefaults) -> None:
    line = _line({"prompt": "question"})
    (base,) = _items(line)
    (other,) = _items(line, defaults=defaults)
    assert other.id != base.id
    if defaults.id_prefix:
        assert other.id == defaults.id_prefix + base.id


def test_a_too_long_id_prefix_is_refused() -> None:
    with pytest.raises(BatchInputError, match="--id-prefix"):
        _items(_line({"prompt": "x"}), defaults=LineDefaults(model="m", id_prefix="p" * 65))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", "line 1: not valid JSON"),
        ("[1, 2]", "line 1: expected a JSON object, got [1, 2]"),
        (_line({"text": "x"}), "line 1: expected a 'prompt', 'messages' or 'request' field"),
        (_line({"prompt": ""}), "line 1: prompt: expected a non-empty string, got ''"),
        (_line({"prompt": "x", "max_tokens": 0}), "line 1: max_tokens: expected a positive"),
        (_line({"prompt": "x", "promt": "y"}), "line 1: promt: unknown field for a short line"),
        (_line({"prompt": "x", "priority": 12}), "line 1: priority: Expected `int` <= 9"),
        (_line({"prompt": "x", "system": 3}), "line 1: system: expected a string, got 3"),
        (_line({"id": 7, "prompt": "x"}), "line 1: id: expected a string of 1..128"),
        (_line({"id": "i" * 129, "prompt": "x"}), "line 1: id: expected a string of 1..128"),
        (
            _line({"messages": [{"role": "robot", "content": "x"}]}),
            "line 1: messages[0].role: expected one of",
        ),
        (_line({"request": {"messages": []}}), "line 1: request.messages: expected a non-empty"),
        (_line({"request": "hi"}), "line 1: request: expected an object, got 'hi'"),
        (
            _line({"request": {"messages": USER_HI}, "reply_to": "t"}),
            "line 1: reply_to: not allowed",
        ),
        (_line({"request": {"messages": USER_HI}, "bogus": 1}), "line 1: bogus: unknown field"),
        (_line({"body": {"messages": USER_HI}}), "line 1: custom_id: missing"),
        (_line({"custom_id": "c", "method": "GET", "body": {}}), "line 1: method: expected"),
        (_line({"custom_id": "c", "url": "/v1/embeddings", "body": {}}), "line 1: url: expected"),
        (
            _line({"custom_id": "c", "body": {"messages": USER_HI, "n": 2}}),
            "line 1: body.n: only 1 choice",
        ),
        (b"\xff\xfe", "line 1: not valid JSON"),
    ],
)
def test_a_bad_line_is_an_error_naming_line_and_field(text: str | bytes, expected: str) -> None:
    (item,) = _items(text)
    assert item.request is None
    assert item.error is not None
    assert item.error.startswith(expected), item.error
    assert 1 <= len(item.id) <= 128


def test_a_bad_line_keeps_its_own_id_and_does_not_stop_the_rest() -> None:
    good1, bad, good2 = _items(
        _line({"prompt": "a"}), _line({"id": "mine", "prompt": ""}), _line({"prompt": "b"})
    )
    assert bad.id == "mine"
    assert bad.error is not None
    assert good1.request is not None
    assert good2.request is not None
    # An anonymous bad line has an id that is stable too (its error line is resumable).
    assert _items("oops")[0].id == _items("oops")[0].id


def test_a_repeated_id_is_an_error_naming_both_lines() -> None:
    first, second = _items(_line({"id": "a", "prompt": "x"}), _line({"id": "a", "prompt": "y"}))
    assert first.request is not None
    assert not first.duplicate
    assert second.duplicate
    assert second.request is None
    assert second.id == "a"
    assert second.error == "line 2: id: 'a' already used on line 1"


# -- results file and resume bookkeeping ------------------------------------------------


def _result(rid: str, line: int, status: str = DONE) -> bytes:
    return msgspec.json.encode(BatchResult(id=rid, line=line, status=status)) + b"\n"


def test_scan_reads_ids_statuses_and_lines() -> None:
    data = _result("a", 1) + b"\n" + _result("b", 2, "upstream_error") + _result("c", 5)
    rec = scan_results(data, source="out.jsonl")
    assert rec.status == {"a": DONE, "b": "upstream_error", "c": DONE}
    assert rec.pairs == {("a", 1), ("b", 2), ("c", 5)}
    assert rec.keep_bytes == len(data)
    assert not rec.needs_newline
    assert rec.count == 3
    assert rec.errors() == Counter({"upstream_error": 1})


def test_scan_drops_a_torn_last_line_and_keeps_a_whole_one_without_newline() -> None:
    whole = _result("a", 1) + _result("b", 2)
    torn = whole + _result("c", 3)[:-9]
    rec = scan_results(torn, source="out.jsonl")
    assert set(rec.status) == {"a", "b"}
    assert rec.keep_bytes == len(whole)
    unterminated = whole + _result("c", 3)[:-1]
    rec = scan_results(unterminated, source="out.jsonl")
    assert set(rec.status) == {"a", "b", "c"}
    assert rec.keep_bytes == len(unterminated)
    assert rec.needs_newline


def test_scan_refuses_a_broken_line_before_the_end() -> None:
    data = _result("a", 1) + b'{"nope": 1}\n' + _result("b", 2)
    with pytest.raises(BatchOutputError, match=r"out\.jsonl line 2: not a result line"):
        scan_results(data, source="out.jsonl")


def test_open_results_cuts_the_torn_tail_and_appends_after_it(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(_result("a", 1) + _result("b", 2)[:10])
    rec, out = open_results(path)
    with out:
        out.write(_result("c", 3))
    assert set(rec.status) == {"a"}
    assert set(scan_results(path.read_bytes(), source="x").status) == {"a", "c"}
    # A whole last result without its newline gets one before the next line.
    path.write_bytes(_result("a", 1)[:-1])
    rec, out = open_results(path)
    with out:
        out.write(_result("d", 4))
    assert set(scan_results(path.read_bytes(), source="x").status) == {"a", "d"}
    # No file yet: nothing recorded, the file is created.
    fresh = tmp_path / "new.jsonl"
    rec, out = open_results(fresh)
    out.close()
    assert rec.count == 0
    assert fresh.exists()


def test_plan_skips_ids_with_a_result_and_counts_recorded_errors() -> None:
    items = _items(
        _line({"id": "a", "prompt": "x"}),
        _line({"id": "b", "prompt": "y"}),
        _line({"id": "a", "prompt": "z"}),  # duplicate of line 1
        _line({"prompt": "w"}),
        "not json",
    )
    data = _result("a", 1) + _result("b", 2, "upstream_unavailable") + _result(items[4].id, 5)
    rec = scan_results(data, source="out")
    plan = plan_batch(items, rec)
    assert (plan.lines, plan.skipped, plan.todo, plan.skipped_errors) == (5, 3, 2, 1)
    todo = [it.line for it in items if not rec.has(it)]
    # The duplicate's own error line was never written, so it is still to do.
    assert todo == [3, 4]
    rec2 = scan_results(data + _result("a", 3, INVALID_INPUT), source="out")
    assert [it.line for it in items if not rec2.has(it)] == [4]


def test_result_lines_carry_every_key_for_done_and_error() -> None:
    (item,) = _items(_line({"id": "r1", "prompt": "x", "metadata": {"k": "v"}}))
    usage = TokenUsage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    timing = Timing(queued_ms=1.0, ttft_ms=2.0, total_ms=3.0)
    done = DoneReply(
        id="r1",
        seq=1,
        finish_reason="stop",
        usage=usage,
        model="fast",
        deployment="sim-a",
        attempts=2,
        cost_usd=0.5,
        timing=timing,
        metadata={"k": "v"},
    )
    ok = result_of(item, Answer(id="r1", text="hello", terminal=done, replies=[done]))
    assert (ok.status, ok.text, ok.usage, ok.timing, ok.attempts) == (
        DONE,
        "hello",
        usage,
        timing,
        2,
    )
    err_body = ErrorBody(code="upstream_error", message="boom")
    err = ErrorReply(id="r1", seq=0, error=err_body)
    failed = result_of(item, Answer(id="r1", text="", terminal=err, replies=[err]))
    assert (failed.status, failed.error, failed.text) == ("upstream_error", err_body, None)
    (bad,) = _items("{")
    invalid = input_error(bad)
    assert invalid.status == INVALID_INPUT
    assert invalid.error is not None
    assert invalid.error.message == bad.error
    keys = set(BatchResult.__struct_fields__)
    for result in (ok, failed, invalid):
        assert set(json.loads(msgspec.json.encode(result))) == keys


# -- the run: window, refill, stop, grace (a fake client, no Kafka) --------------------

# Every wait on the fake below has this deadline; none is expected to come near it.
FAKE_DEADLINE_S = 30.0


class FakeAsker:
    """Answers `ask` at once, except for ids gated until their event is set."""

    reply_topic = "fake.replies"

    def __init__(self, gated: Collection[str] = (), fail: Collection[str] = ()) -> None:
        self.gates = {rid: asyncio.Event() for rid in gated}
        self.fail = set(fail)
        self.asked: list[str] = []
        self.answered: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def ask(self, body: Request, *, timeout_s: float | None = None) -> Answer:
        assert body.reply_to == self.reply_topic
        self.asked.append(body.id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if body.id in self.fail:
                raise TimeoutError
            await asyncio.sleep(0)  # a round trip: other workers run meanwhile
            if body.id in self.gates:
                await self.gates[body.id].wait()
            done = DoneReply(
                id=body.id,
                seq=0,
                finish_reason="stop",
                usage=TokenUsage(),
                model="fast",
                deployment="d",
            )
            self.answered.append(body.id)
            return Answer(id=body.id, text=f"answer {body.id}", terminal=done, replies=[done])
        finally:
            self.in_flight -= 1


async def _until(cond: Callable[[], bool], what: str) -> None:
    give_up = time.monotonic() + FAKE_DEADLINE_S
    while not cond():
        assert time.monotonic() < give_up, what
        await asyncio.sleep(0.001)


def _fake_run(asker: FakeAsker, total: int, **opts: Any) -> tuple[BatchRun, io.BytesIO]:
    out = io.BytesIO()
    tally = Tally(total=total)
    options = batch_options(**opts)
    view = LogView(tally, interval_s=FAKE_DEADLINE_S)
    return BatchRun(asker, out, tally, view, options), out


def _written(out: io.BytesIO) -> list[str]:
    return [json.loads(ln)["id"] for ln in out.getvalue().splitlines()]


def _prompts(n: int) -> list[BatchItem]:
    return _items(*[_line({"id": f"r{i}", "prompt": f"p{i}"}) for i in range(n)])


async def test_the_window_bounds_what_is_in_flight_and_refills_without_barriers() -> None:
    items = _prompts(10)
    asker = FakeAsker(gated={"r0"})
    run, out = _fake_run(asker, len(items), window=3)
    task = asyncio.ensure_future(run.execute(iter(items), workers=3))
    # r0 is still out, yet every other line went through the two free slots.
    await _until(lambda: len(asker.answered) == 9, "the other nine were not answered")
    assert asker.max_in_flight == 3
    assert "r0" not in asker.answered
    assert _written(out) == [f"r{i}" for i in range(1, 10)]
    asker.gates["r0"].set()
    await asyncio.wait_for(task, FAKE_DEADLINE_S)
    assert _written(out)[-1] == "r0"
    assert run.abandoned == 0
    assert run.signal is None


async def test_a_signal_stops_publishing_and_waits_the_grace_for_what_is_in_flight() -> None:
    items = _prompts(10)
    asker = FakeAsker(gated={"r0", "r1"})
    run, out = _fake_run(asker, len(items), window=2, grace_s=0.5)
    task = asyncio.ensure_future(run.execute(iter(items), workers=2))
    await _until(lambda: asker.in_flight == 2, "two were not in flight")
    run.on_signal(signal.SIGINT)
    asker.gates["r0"].set()  # answered within the grace: written
    await asyncio.wait_for(task, FAKE_DEADLINE_S)
    assert asker.asked == ["r0", "r1"]  # nothing published after the signal
    assert _written(out) == ["r0"]
    assert run.abandoned == 1  # r1: no line, so a resume sends it again
    assert run.signal == signal.SIGINT


async def test_a_second_signal_stops_at_once() -> None:
    items = _prompts(4)
    asker = FakeAsker(gated={"r0", "r1"})
    run, out = _fake_run(asker, len(items), window=2, grace_s=3600.0)
    task = asyncio.ensure_future(run.execute(iter(items), workers=2))
    await _until(lambda: asker.in_flight == 2, "two were not in flight")
    run.on_signal(signal.SIGTERM)
    run.on_signal(signal.SIGTERM)
    await asyncio.wait_for(task, FAKE_DEADLINE_S)
    assert _written(out) == []
    assert run.abandoned == 2
    assert run.signal == signal.SIGTERM


async def test_no_reply_in_time_gives_up_and_bad_lines_are_written_unsent() -> None:
    items = _items(
        "not json", _line({"id": "r0", "prompt": "x"}), _line({"id": "r1", "prompt": "y"})
    )
    asker = FakeAsker(fail={"r0"})
    run, out = _fake_run(asker, len(items), window=1, grace_s=0.0)
    await asyncio.wait_for(run.execute(iter(items), workers=1), FAKE_DEADLINE_S)
    assert asker.asked == ["r0"]  # the bad line was never sent; r1 not after giving up
    assert _written(out) == [items[0].id]
    assert run.gave_up is not None
    assert "line 2 (id r0)" in run.gave_up


# -- progress and options ---------------------------------------------------------------


def test_tally_rate_eta_and_summary_follow_the_counts() -> None:
    tally = Tally(total=10, started=100.0)
    for status in (DONE, DONE, DONE, "upstream_error"):
        usage = TokenUsage(prompt_tokens=2, completion_tokens=3) if status == DONE else None
        tally.add(BatchResult(id="x", line=1, status=status, usage=usage, cost_usd=0.25))
    assert (tally.finished, tally.errors) == (4, 1)
    assert (tally.prompt_tokens, tally.completion_tokens) == (6, 9)
    assert tally.rate(now=102.0) == 4 / 2.0
    assert tally.by_status() == "done 3, upstream_error 1"
    # 6 left at 2 req/s: 3 s.
    assert progress_line(tally, now=102.0) == ("batch: 4/10 (40.0%), 2.0 req/s, eta 3s, errors 1")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0s"), (59, "59s"), (61, "1m01s"), (3600 + 300, "1h05m")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("given", "flag"),
    [({"window": 0}, "--window"), ({"grace_s": -1.0}, "--grace"), ({"timeout_s": 0}, "--timeout")],
)
def test_bad_options_name_their_flag(given: dict[str, Any], flag: str) -> None:
    with pytest.raises(BatchInputError, match=f"^{flag}: "):
        batch_options(**given)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give a PROMPT, or --file with --out"),
        (["hi", "--file", "in.jsonl"], "give either a PROMPT or --file, not both"),
        (["--file", "in.jsonl"], "--out: required with --file"),
        (["hi", "--window", "4"], "--window: only with --file"),
        (["hi", "--out", "o.jsonl"], "--out: only with --file"),
        (["--file", "i", "--out", "o", "--no-stream"], "--no-stream: only with a PROMPT"),
    ],
)
def test_send_takes_one_prompt_or_a_file(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["send", "--config", str(tmp_path / "unused.yaml"), *argv])
    assert code == 2
    assert f"quotaflow: error: {message}" in capsys.readouterr().err


# -- end to end -------------------------------------------------------------------------

SIM_MODEL = "sim-small"
MAX_TOKENS = 8
# The CLI starts, connects and sends a few hundred requests through a 2-core stack.
RUN_TIMEOUT_S = 240.0
# Until the interrupted run has written its first results.
PROGRESS_TIMEOUT_S = 120.0
# After the signal: in flight are answered within this (the run's --grace is the same).
GRACE_S = 60.0


def _expected(stack: Stack, prompt: str) -> str:
    sim = stack.config.simulator
    assert sim is not None
    n = completion_tokens_for(MAX_TOKENS, sim)
    return expected_text(SIM_MODEL, [{"role": "user", "content": prompt}], n)


def _batch_cmd(stack: Stack, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "send",
        "--config",
        str(stack.config_path),
        "--model",
        "fast",
        "--max-tokens",
        str(MAX_TOKENS),
        "--file",
        str(inp),
        "--out",
        str(out),
        "--grace",
        str(GRACE_S),
        *extra,
    ]


async def _start(cmd: list[str], log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=err
        )


async def _finish(proc: asyncio.subprocess.Process, log: Path) -> tuple[int, str]:
    try:
        code = await asyncio.wait_for(proc.wait(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"batch did not finish in {RUN_TIMEOUT_S} s: {_text(log)}") from None
    return code, _text(log)


def _text(path: Path) -> str:
    return path.read_text()


async def _run(cmd: list[str], log: Path) -> tuple[int, str]:
    return await _finish(await _start(cmd, log), log)


def _results(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]


async def _wait_lines(out: Path, at_least: int, proc: asyncio.subprocess.Process) -> int:
    give_up = time.monotonic() + PROGRESS_TIMEOUT_S
    while True:
        n = len(_results(out))
        if n >= at_least:
            return n
        assert proc.returncode is None, f"batch exited ({proc.returncode}) before {at_least}"
        assert time.monotonic() < give_up, f"only {n} results after {PROGRESS_TIMEOUT_S} s"
        await asyncio.sleep(0.05)


async def _admitted_calls(stack: Stack, ids: set[str]) -> Counter[str]:
    """Upstream calls the simulator admitted (HTTP 200) per request id, once all have one."""
    give_up = time.monotonic() + PROGRESS_TIMEOUT_S
    while True:
        calls: Counter[str] = Counter()
        for ln in stack.sim_log.read_text().splitlines():
            rec = json.loads(ln)
            if rec.get("client_request_id") in ids and rec.get("status") == 200:
                calls[rec["client_request_id"]] += 1
        if set(calls) >= ids or time.monotonic() > give_up:
            return calls
        await asyncio.sleep(0.1)


def _skipped(stderr: str) -> int:
    line = next(ln for ln in stderr.splitlines() if "already done in" in ln)
    return int(line.split("skipped ", 1)[1].split(" ", 1)[0])


@pytest.mark.integration
async def test_a_batch_file_gets_one_result_line_per_request(stack: Stack, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    count = 300
    prompts = {i: f"batch {tag} prompt {i}" for i in range(count)}
    lines = [_line({"prompt": p}) for p in prompts.values()]
    # The other forms, each once; then a bad line and a repeated id.
    lines[1] = _line({"id": f"{tag}-own", "prompt": prompts[1]})
    lines[2] = _line(
        {"request": {"messages": [{"role": "user", "content": prompts[2]}]}, "priority": 1}
    )
    lines[3] = _line({"messages": [{"role": "user", "content": prompts[3]}]})
    lines[4] = _line(
        {"custom_id": f"{tag}-c", "body": {"messages": [{"role": "user", "content": prompts[4]}]}}
    )
    lines.append(_line({"prompt": "", "metadata": {}}))
    lines.append(_line({"id": f"{tag}-own", "prompt": "again"}))
    inp, out, log = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl", tmp_path / "err.log"
    inp.write_text("\n".join(lines) + "\n")

    code, stderr = await _run(_batch_cmd(stack, inp, out, "--window", "50"), log)

    assert code == 1, stderr  # two lines are errors
    results = _results(out)
    assert len(results) == len(lines), stderr
    by_line = {r["line"]: r for r in results}
    assert sorted(by_line) == list(range(1, len(lines) + 1))
    for i, prompt in prompts.items():
        r = by_line[i + 1]
        assert r["status"] == DONE, r
        assert r["text"] == _expected(stack, prompt), r
        assert r["model"] == "fast"
        assert r["deployment"] in ("sim-a", "sim-b")
        assert r["usage"]["completion_tokens"] == len(r["text"].split(" "))
    assert by_line[2]["id"] == f"{tag}-own"
    assert by_line[5]["id"] == f"{tag}-c"
    bad, repeated = by_line[count + 1], by_line[count + 2]
    assert bad["status"] == INVALID_INPUT
    assert bad["error"]["message"].startswith(f"line {count + 1}: prompt: expected")
    assert repeated["status"] == INVALID_INPUT
    assert repeated["id"] == f"{tag}-own"
    assert repeated["error"]["message"] == (
        f"line {count + 2}: id: '{tag}-own' already used on line 2"
    )
    assert f"done {count}, invalid_request 2" in stderr
    sent = {r["id"] for r in results if r["status"] == DONE}
    calls = await _admitted_calls(stack, sent)
    assert calls == Counter(dict.fromkeys(sent, 1))


@pytest.mark.integration
async def test_an_interrupted_batch_resumes_without_resending(stack: Stack, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    count = 800
    prompts = [f"resume {tag} prompt {i}" for i in range(count)]
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    inp.write_text("".join(_line({"prompt": p}) + "\n" for p in prompts))
    cmd = _batch_cmd(stack, inp, out, "--window", "32")

    # Run 1: SIGINT once some results are written.
    log1 = tmp_path / "run1.log"
    proc = await _start(cmd, log1)
    await _wait_lines(out, 100, proc)
    proc.send_signal(signal.SIGINT)
    code1, err1 = await _finish(proc, log1)
    written1 = len(_results(out))
    assert code1 == 130, err1
    assert written1 < count, "run 1 finished before the signal: nothing to resume"
    assert "0 in flight not answered in time" in err1, err1
    assert "to resume, run the same command again" in err1

    # Run 2: skips those, then SIGTERM.
    log2 = tmp_path / "run2.log"
    proc = await _start(cmd, log2)
    await _wait_lines(out, written1 + 100, proc)
    proc.send_signal(signal.SIGTERM)
    code2, err2 = await _finish(proc, log2)
    written2 = len(_results(out))
    assert code2 == 143, err2
    assert _skipped(err2) == written1, err2
    assert written2 < count, "run 2 finished before the signal"

    # Run 3: the rest.
    code3, err3 = await _run(cmd, tmp_path / "run3.log")
    assert code3 == 0, err3
    assert _skipped(err3) == written2, err3
    results = _results(out)
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == count
    assert sorted(r["line"] for r in results) == list(range(1, count + 1))
    for r in results:
        assert r["status"] == DONE, r
        assert r["text"] == _expected(stack, prompts[r["line"] - 1]), r
    # Each request reached the upstream exactly once over the three runs.
    calls = await _admitted_calls(stack, set(ids))
    assert calls == Counter(dict.fromkeys(ids, 1))


@pytest.mark.integration
async def test_a_batch_stopped_by_two_sigints_resumes_to_completion(
    stack: Stack, tmp_path: Path
) -> None:
    """Two signals: no grace, so what was in flight (if anything) has no line and is sent
    again on resume; the abandoning itself is shown with a fake client above."""
    tag = uuid.uuid4().hex[:8]
    count = 400
    prompts = [f"hurry {tag} prompt {i}" for i in range(count)]
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    inp.write_text("".join(_line({"prompt": p}) + "\n" for p in prompts))
    cmd = _batch_cmd(stack, inp, out, "--window", "64")

    log1 = tmp_path / "run1.log"
    proc = await _start(cmd, log1)
    await _wait_lines(out, 50, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # no grace: whatever is in flight is left unwritten
    code1, err1 = await _finish(proc, log1)
    written1 = len(_results(out))
    assert code1 == 130, err1
    assert written1 < count, "run 1 finished before the signal"
    assert "in flight not answered in time" in err1, err1

    code2, err2 = await _run(cmd, tmp_path / "run2.log")
    assert code2 == 0, err2
    assert _skipped(err2) == written1, err2
    results = _results(out)
    assert sorted(r["line"] for r in results) == list(range(1, count + 1))
    assert len({r["id"] for r in results}) == count
    for r in results:
        assert r["status"] == DONE, r
        assert r["text"] == _expected(stack, prompts[r["line"] - 1]), r
