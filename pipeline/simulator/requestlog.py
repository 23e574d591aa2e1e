"""The JSONL request log: one flushed line per finished request, never a key value."""

from __future__ import annotations

from pathlib import Path
from typing import IO

import msgspec

__all__ = ["RequestLog", "RequestRecord"]


class RequestRecord(msgspec.Struct, kw_only=True):
    """One finished chat completion request; `key` is the api_key_env name."""

    ts_ms: int
    key: str | None
    model: str | None
    status: int | None  # None: the connection was dropped before any status was sent
    stream: bool
    prompt_tokens: int | None
    max_tokens: int | None
    charged_tokens: int | None  # None: not admitted (401, 400, 429), so nothing charged
    completion_tokens: int
    fault: str | None
    client_request_id: str | None
    duration_ms: float


class RequestLog:
    """Appends records to a file, flushing each line so readers see it at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] | None = self.path.open("ab")
        self._encoder = msgspec.json.Encoder()

    def write(self, record: RequestRecord) -> None:
        """Append one line and flush it."""
        if self._file is None:
            return
        self._file.write(self._encoder.encode(record) + b"\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file; later writes are ignored."""
        if self._file is not None:
            self._file.close()
            self._file = None
