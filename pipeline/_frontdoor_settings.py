"""`quotaflow serve`'s settings: the config file's `frontdoor` section, CLI options on top.

`FrontDoorSettings` is `topics.config.FrontDoorConfig`; this module stays light (msgspec
only) so the CLI parser can show the defaults.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from topics.config import FrontDoorConfig
from topics.errors import ConfigError

__all__ = ["DEFAULT_REPLY_TOPIC", "FrontDoorSettings", "option_name", "settings_from"]

FrontDoorSettings = FrontDoorConfig
# Its own reply topic: the front door then decodes only its own replies, not those of
# every Kafka client on `llm.responses` (nor they the front door's).
DEFAULT_REPLY_TOPIC: Final = FrontDoorConfig().reply_topic


def option_name(field: str) -> str:
    """The CLI option of a settings field: `request_timeout_s` -> `--request-timeout`."""
    return "--" + field.removesuffix("_s").replace("_", "-")


def settings_from(base: FrontDoorConfig | None = None, **options: Any) -> FrontDoorConfig:
    """`base` (the config file's section) with the CLI options given (None: keep it);
    errors name the option."""
    given = {k: v for k, v in options.items() if v is not None}
    merged = {**msgspec.structs.asdict(base or FrontDoorConfig()), **given}
    try:
        return msgspec.convert(merged, FrontDoorConfig)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        field = msg.rsplit("`$.", 1)[-1].rstrip("`") if "`$." in msg else None
        where = option_name(field) if field else "quotaflow serve"
        shown = given.get(field or "")
        raise ConfigError(f"{where}: {msg.split(' - at ')[0]}, got {shown!r}") from None
