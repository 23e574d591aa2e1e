"""structlog setup shared by every process (gateway, actors, simulator): JSON, secrets redacted.

Request id and tenant are bound per request by the code that logs; this module only makes
sure nothing that looks like a credential is ever rendered.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

from topics.config import LoggingConfig

__all__ = ["configure_logging", "redact"]

_SECRET_KEYS: Final = frozenset(
    {"authorization", "api_key", "apikey", "key", "token", "password", "secret", "x-api-key"}
)
# Bearer tokens and OpenAI/Anthropic-style keys anywhere in a logged string.
_SECRET_TEXT: Final = re.compile(r"(?i)(bearer\s+)[^\s\"',]+|\b(sk|pk|rk)-[A-Za-z0-9_\-]{6,}")
REDACTED: Final = "[redacted]"


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _SECRET_TEXT.sub(lambda m: (m.group(1) or "") + REDACTED, value)
    if isinstance(value, dict):
        return {
            k: REDACTED if str(k).lower() in _SECRET_KEYS else _scrub(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: drop secret-named fields and mask key-shaped strings."""
    for k in list(event_dict):
        event_dict[k] = REDACTED if k.lower() in _SECRET_KEYS else _scrub(event_dict[k])
    return event_dict


def configure_logging(config: LoggingConfig | None = None) -> None:
    """JSON lines on stderr (or console rendering when `json: false`)."""
    config = config or LoggingConfig()
    level = getattr(logging, config.level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer() if config.json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
