"""How `quotaflow send --file` runs: window, grace, timeout, progress, id prefix.

Kept apart from `pipeline.batch` (no Kafka imports) so the CLI can show the defaults in
its help without loading the client.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from pipeline._batch_lines import MAX_ID_PREFIX, BatchInputError

__all__ = ["OPTION_FLAGS", "BatchOptions", "batch_options"]


class BatchOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Every default here is the CLI's."""

    # Requests in flight at once; the next is published as soon as one is answered.
    window: Annotated[int, msgspec.Meta(ge=1)] = 256
    # After SIGINT/SIGTERM: seconds to wait for the requests in flight before exiting
    # (what arrives is written; the rest is sent again on resume).
    grace_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    # Seconds without any reply to one request before the batch gives up: it stops
    # publishing, as on SIGINT, and exits 1 (resumable). Requests waiting for quota get
    # no reply until they run, so a small rate limit with a big window needs more.
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    # Without a terminal on stderr (CI logs): one progress line every this many seconds.
    progress_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    # Put before every derived id (e.g. a date, so tomorrow's identical line is new).
    id_prefix: Annotated[str, msgspec.Meta(max_length=MAX_ID_PREFIX)] = ""


# The CLI flag of each field, so an error names what the user typed.
OPTION_FLAGS: Final = {
    "window": "--window",
    "grace_s": "--grace",
    "timeout_s": "--timeout",
    "progress_interval_s": "--progress-interval",
    "id_prefix": "--id-prefix",
}


def batch_options(**given: Any) -> BatchOptions:
    """Validated options; `None` values take the default. Errors name the CLI flag."""
    fields = {k: v for k, v in given.items() if v is not None}
    try:
        return msgspec.convert(fields, BatchOptions)
    except msgspec.ValidationError as exc:
        message = str(exc)
        for name, flag in OPTION_FLAGS.items():
            if f"`$.{name}`" in message:
                base = message.split(" - at ")[0]
                got = "" if "got" in base else f", got {fields.get(name)!r}"
                raise BatchInputError(f"{flag}: {base}{got}") from None
        raise BatchInputError(message) from None
