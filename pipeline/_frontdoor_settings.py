"""`quotaflow serve`'s settings, kept light (msgspec only) so the CLI parser can show defaults.

They are CLI options until the config file grows a `frontdoor` section; the Struct is
what that section would be.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from topics.errors import ConfigError

__all__ = ["DEFAULT_REPLY_TOPIC", "FrontDoorSettings", "option_name", "settings_from"]

# Its own reply topic: the front door then decodes only its own replies, not those of
# every Kafka client on `llm.responses` (nor they the front door's).
DEFAULT_REPLY_TOPIC: Final = "llm.responses.frontdoor"

TopicName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")]


class FrontDoorSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How `quotaflow serve` listens, where its replies come back, how long it waits."""

    host: str = "127.0.0.1"
    # 0 picks a free port.
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # Replies for HTTP clients; created at start like the gateway's topics (create_missing).
    reply_topic: TopicName = DEFAULT_REPLY_TOPIC
    # An HTTP request without a terminal reply after this long is answered 504 `timeout`.
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    # Larger bodies are refused with 413; Kafka's default message limit is 1 MiB anyway.
    max_body_bytes: Annotated[int, msgspec.Meta(gt=0)] = 1_048_576
    # On SIGTERM, requests in flight get this long to finish before they are cut.
    drain_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0


def option_name(field: str) -> str:
    """The CLI option of a settings field: `request_timeout_s` -> `--request-timeout`."""
    return "--" + field.removesuffix("_s").replace("_", "-")


def settings_from(**options: Any) -> FrontDoorSettings:
    """Settings from CLI options by field name (None: the default); errors name the option."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return msgspec.convert(given, FrontDoorSettings)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        field = msg.rsplit("`$.", 1)[-1].rstrip("`") if "`$." in msg else None
        where = option_name(field) if field else "quotaflow serve"
        shown = given.get(field or "")
        raise ConfigError(f"{where}: {msg.split(' - at ')[0]}, got {shown!r}") from None
