"""`quotaflow send`'s two forms, one PROMPT or `--file`: their checks and help text.

Kept free of Kafka imports: the CLI builds its parser from this on every command.
"""

from __future__ import annotations

import argparse
from typing import Final

from topics.errors import QuotaflowError

__all__ = ["BATCH_ONLY", "SEND_EPILOG", "SINGLE_TIMEOUT_S", "SendArgsError", "check_send_args"]

# One PROMPT: seconds to wait for each reply of the answer.
SINGLE_TIMEOUT_S: Final = 120.0
# Options that mean something only with --file (attribute name -> flag).
BATCH_ONLY: Final = {
    "out": "--out",
    "window": "--window",
    "grace": "--grace",
    "progress_interval": "--progress-interval",
    "id_prefix": "--id-prefix",
}

SEND_EPILOG: Final = """\
With --file IN.jsonl --out OUT.jsonl every line of IN is one request; at most --window
are in flight, the next is sent as soon as one is answered. Accepted lines (JSON objects):
  {"id"?, "prompt": "...", "system"?, "model"?, "max_tokens"?, "temperature"?, "tenant"?,
   "priority"?, "deadline_ms"?, "tier"?, "task"?, "cache"?, "metadata"?}
  {"id"?, "request": {OpenAI Chat Completions body}, "tenant"?, "priority"?, ...}
  {"id"?, "messages": [...], "model"?, ...}          (a bare OpenAI body)
  {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
                                                     (an OpenAI Batch API line)
--model, --tenant and --max-tokens fill in what a line leaves out. A line without an id
gets one derived from its request, the same on every run. OUT gets one line per request
as it finishes: {"id", "line", "status": "done" or the error code, "text", "model",
"deployment", "cache", "usage", "cost_usd", "attempts", "timing", "metadata", "error"}.
A line that cannot be sent is an "invalid_request" result naming the line and field.
If OUT exists, ids that have a line there are skipped: rerun the same command to resume.
Ctrl-C/SIGTERM stop publishing, wait --grace seconds for what is in flight and exit
130/143. Exit 0 when every line is done, 1 when some are errors (or the batch gave up).
"""


class SendArgsError(QuotaflowError):
    """`quotaflow send` options that do not go together (the message names them)."""


def check_send_args(args: argparse.Namespace) -> None:
    """Exactly one of PROMPT or --file; --out with --file; batch options only with it."""
    if args.prompt is not None and args.file is not None:
        raise SendArgsError("give either a PROMPT or --file, not both")
    if args.prompt is None and args.file is None:
        raise SendArgsError("give a PROMPT, or --file with --out")
    if args.file is None:
        for attr, flag in BATCH_ONLY.items():
            if getattr(args, attr, None) is not None:
                raise SendArgsError(f"{flag}: only with --file")
        return
    if args.out is None:
        raise SendArgsError("--out: required with --file (results go there, one per line)")
    if args.no_stream:
        raise SendArgsError(
            "--no-stream: only with a PROMPT (batch lines stream only if their body says so)"
        )
