"""`quotaflow send`: one request, its tokens streamed to stdout as they arrive."""

from __future__ import annotations

import os
import sys

from pipeline.client import QuotaflowClient
from topics.config import Config, resolve_secret
from topics.wire import ChunkReply, CompletionReply, DoneReply, ErrorReply, ResetReply

__all__ = ["send_one"]


async def send_one(
    config: Config,
    *,
    prompt: str,
    model: str,
    tenant: str,
    stream: bool,
    max_tokens: int | None,
    api_key_env: str | None,
    timeout_s: float,
) -> int:
    """Print the answer to stdout and a one-line summary to stderr; exit 0 on done, 1 on error."""
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    key = resolve_secret(api_key_env, what="--api-key-env") if api_key_env else None
    async with QuotaflowClient(
        config.kafka.bootstrap_servers,
        requests_topic=config.topics.requests,
        reply_topic=config.topics.responses,
        tenant=tenant,
        api_key=key,
    ) as client:
        async for reply in client.stream(body, timeout_s=timeout_s):
            if isinstance(reply, ChunkReply):
                for choice in reply.chunk.get("choices") or []:
                    sys.stdout.write((choice.get("delta") or {}).get("content") or "")
                sys.stdout.flush()
            elif isinstance(reply, CompletionReply):
                choices = reply.completion.get("choices") or [{}]
                sys.stdout.write(str((choices[0].get("message") or {}).get("content") or ""))
            elif isinstance(reply, ResetReply):
                sys.stdout.write(f"{os.linesep}[reset: {reply.reason}]{os.linesep}")
            elif isinstance(reply, DoneReply):
                sys.stdout.write(os.linesep)
                print(
                    f"[done] model={reply.model} deployment={reply.deployment} "
                    f"cache={reply.cache} tokens={reply.usage.total_tokens} "
                    f"cost=${reply.cost_usd:.6f} ttft={reply.timing.ttft_ms}ms "
                    f"total={reply.timing.total_ms}ms",
                    file=sys.stderr,
                )
                return 0
            elif isinstance(reply, ErrorReply):
                print(f"[error] {reply.error.code}: {reply.error.message}", file=sys.stderr)
                return 1
    return 1
