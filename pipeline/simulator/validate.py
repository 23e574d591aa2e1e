"""Chat Completions body validation with OpenAI-style 400 messages naming field and value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BadRequest", "ChatRequest", "validate_chat_body"]

_MAX_SHOWN = 80


class BadRequest(Exception):
    """A body field is missing or wrong; `param` names it as OpenAI's `error.param` does."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a chat completion request the simulator acts on."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None
    stream: bool
    include_usage: bool


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _type_name(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a decimal",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _invalid_type(param: str, expected: str, value: Any) -> BadRequest:
    return BadRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} "
        f"instead (value {_show(value)}).",
        param,
    )


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(name, "an integer", value)
    if value < 1:
        raise BadRequest(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
            f"but got {value} instead.",
            name,
        )
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise BadRequest("Missing required parameter: 'messages'.", "messages")
    if not isinstance(value, list):
        raise _invalid_type("messages", "an array", value)
    if not value:
        raise BadRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            "messages",
        )
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _invalid_type(where, "an object", msg)
        role = msg.get("role")
        if role is None:
            raise BadRequest(f"Missing required parameter: '{where}.role'.", f"{where}.role")
        if not isinstance(role, str) or not role:
            raise _invalid_type(f"{where}.role", "a non-empty string", role)
        if "content" not in msg:
            raise BadRequest(f"Missing required parameter: '{where}.content'.", f"{where}.content")
        content = msg["content"]
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise _invalid_type(f"{where}.content[{j}]", "an object", part)
        elif not isinstance(content, str):
            raise _invalid_type(f"{where}.content", "one of a string or array of objects", content)
    return value


def validate_chat_body(body: Any) -> ChatRequest:
    """Check a decoded JSON body; raises BadRequest naming the first wrong field."""
    if not isinstance(body, dict):
        raise BadRequest(
            f"Invalid request body: expected a JSON object, but got {_type_name(body)} "
            f"instead (value {_show(body)}).",
            None,
        )
    model = body.get("model")
    if model is None:
        raise BadRequest("Missing required parameter: 'model'.", "model")
    if not isinstance(model, str) or not model:
        raise _invalid_type("model", "a non-empty string", model)
    messages = _messages(body.get("messages"))
    max_tokens = _positive_int(body, "max_tokens")
    max_completion = _positive_int(body, "max_completion_tokens")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid_type("stream", "a boolean", stream)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid_type("stream_options", "an object", options)
        if not stream:
            raise BadRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )
        usage = options.get("include_usage", False)
        if not isinstance(usage, bool):
            raise _invalid_type("stream_options.include_usage", "a boolean", usage)
        include_usage = usage
    return ChatRequest(
        model=model,
        messages=messages,
        # max_completion_tokens supersedes the deprecated max_tokens when both are sent.
        max_tokens=max_completion if max_completion is not None else max_tokens,
        stream=stream,
        include_usage=include_usage,
    )
