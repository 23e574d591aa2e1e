"""LiteLLM's `Router` as the benchmarks' peer: imported offline and quiet, retries off.

The Router gets the same deployments as the gateway (same simulator, same keys read from
the same environment variables) behind the same public model name, so a request through it
and one through quotaflow reach the same upstream the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import time
from typing import Any

from topics.config import Config

__all__ = ["LiteLLMPeer", "import_litellm", "litellm_version"]

_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm")
_CALLBACK_LISTS = (
    "callbacks",
    "success_callback",
    "failure_callback",
    "input_callback",
    "service_callback",
    "_async_success_callback",
    "_async_failure_callback",
    "_async_input_callback",
)


def litellm_version() -> str | None:
    """The installed litellm version, or None."""
    try:
        return importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        return None


def import_litellm(*, streaming_logging: bool) -> Any:
    """`litellm`, offline (the cost map shipped in the package), its loggers quiet and no
    logging callback registered; `streaming_logging=False` also skips its per-chunk success
    logging (`litellm.disable_streaming_logging`), which only feeds callbacks."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    litellm: Any = importlib.import_module("litellm")
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    litellm.disable_streaming_logging = not streaming_logging
    for name in _CALLBACK_LISTS:
        if isinstance(getattr(litellm, name, None), list):
            setattr(litellm, name, [])
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return litellm


class LiteLLMPeer:
    """`litellm.Router.acompletion(stream=True)` over the config's deployments of `model`."""

    def __init__(
        self, config: Config, model: str, max_tokens: int, *, streaming_logging: bool
    ) -> None:
        self.litellm = import_litellm(streaming_logging=streaming_logging)
        self.model = model
        self.max_tokens = max_tokens
        wanted = next(m for m in config.models if m.name == model)
        by_name = {d.name: d for d in config.deployments}
        model_list = [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{by_name[name].model}",
                    "api_base": by_name[name].base_url,
                    "api_key": os.environ[by_name[name].api_key_env],
                },
            }
            for name in wanted.deployments
        ]
        self.router = self.litellm.Router(model_list=model_list, num_retries=0)

    def settings(self) -> dict[str, Any]:
        """Version and what shapes its behaviour here (for the results JSON)."""
        out: dict[str, Any] = {
            "version": litellm_version(),
            "deployments": len(self.router.model_list),
            "disable_streaming_logging": self.litellm.disable_streaming_logging,
        }
        with contextlib.suppress(Exception):
            out["num_retries"] = self.router.num_retries
        with contextlib.suppress(Exception):
            out["routing_strategy"] = self.router.settings().routing_strategy
        return out

    async def call(self, prompt: str, request_id: str) -> tuple[float, float]:
        """Stream one answer; `perf_counter()` at the first content chunk and at the end."""
        first: float | None = None
        resp = await self.router.acompletion(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=self.max_tokens,
            stream=True,
            extra_headers={"X-Client-Request-Id": request_id},
        )
        async for chunk in resp:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
        if first is None:
            raise RuntimeError("litellm: the stream carried no content")
        return first, time.perf_counter()
