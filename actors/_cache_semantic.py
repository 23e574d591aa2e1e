"""The semantic side of a cache shard: embeddings off the event loop, one vector index.

The model, the index and the verifier are in `actors._semantic`, part of the optional
extra `quotaflow[semantic]`; it and numpy are imported only when
`cache.semantic.enabled` is true, so the rest of quotaflow needs neither.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Final, Protocol

from topics.config import SemanticCacheConfig
from topics.errors import QuotaflowError

__all__ = [
    "INSTALL_HINT",
    "Embedder",
    "SemanticCache",
    "SemanticIndex",
    "check_semantic",
    "semantic_module",
]

SEMANTIC_MODULE: Final = "actors._semantic"
INSTALL_HINT: Final = "pip install 'quotaflow[semantic]'"
# Embeddings travel to the changelog topic as little-endian float32.
_VECTOR_DTYPE: Final = "<f4"


class Embedder(Protocol):
    """Texts to normalised embeddings (n, dim), float32; blocking (run it in a thread)."""

    def embed(self, texts: Sequence[str]) -> Any: ...


class SemanticIndex(Protocol):
    """Vectors by scope; `search` returns the best verified candidate (key, probability)."""

    def add(self, scope: str, key: str, text: str, vector: Any, *, model: str) -> None: ...

    def remove(self, key: str) -> None: ...

    def search(
        self, scope: str, text: str, vector: Any, *, model: str
    ) -> tuple[str, float] | None: ...

    def __len__(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...


def semantic_module() -> ModuleType:
    """`actors._semantic`, or a QuotaflowError saying how to get it."""
    try:
        return importlib.import_module(SEMANTIC_MODULE)
    except ImportError as exc:
        raise QuotaflowError(
            f"cache.semantic.enabled is true, but the semantic cache cannot be loaded "
            f"({type(exc).__name__}: {exc}); install the extra with {INSTALL_HINT}, or set "
            "cache.semantic.enabled: false"
        ) from None


def check_semantic(config: SemanticCacheConfig) -> None:
    """Fail now, not in the shards, if the module, the model package or the verifier
    weights are missing (raises a QuotaflowError that says what to install)."""
    mod = semantic_module()
    mod.model_file()
    if config.verifier_min_probability > 0:
        mod.Verifier.load()


class SemanticCache:
    """An index of one shard's entries plus its embedder, called from the shard's loop.

    Embedding runs in a worker thread (one batch of `batch_size` texts per model call,
    one call at a time: the model is not assumed thread-safe); index calls run on the
    loop, so index changes and searches never interleave.
    """

    def __init__(
        self,
        config: SemanticCacheConfig,
        *,
        embedder: Embedder,
        index: SemanticIndex,
        np: ModuleType,
    ) -> None:
        self._batch = config.batch_size
        self._embedder = embedder
        self.index = index
        self._np = np
        self._lock = asyncio.Lock()
        self._keys: set[str] = set()
        self.embedded = 0
        self.embed_calls = 0

    @classmethod
    def load(cls, config: SemanticCacheConfig) -> SemanticCache:
        """Build from `actors._semantic` (blocking: loads the verifier). A minimum
        probability of 0 accepts every candidate: no verifier is loaded then."""
        mod = semantic_module()
        verifier = mod.Verifier.load() if config.verifier_min_probability > 0 else None
        index = mod.SemanticIndex(
            threshold=config.threshold,
            thresholds=dict(config.thresholds),
            min_probability=config.verifier_min_probability,
            verifier=verifier,
        )
        return cls(
            config, embedder=mod.Embedder(), index=index, np=importlib.import_module("numpy")
        )

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def _embed_all(self, texts: list[str]) -> list[Any]:
        rows: list[Any] = []
        for i in range(0, len(texts), self._batch):
            chunk = texts[i : i + self._batch]
            vectors = self._embedder.embed(chunk)
            rows.extend(vectors[j] for j in range(len(chunk)))
        return rows

    async def embed(self, texts: list[str]) -> list[Any]:
        """One vector per text, computed in a worker thread."""
        if not texts:
            return []
        async with self._lock:
            rows = await asyncio.to_thread(self._embed_all, texts)
        self.embedded += len(texts)
        self.embed_calls += 1
        return rows

    def search(self, scope: str, text: str, vector: Any, *, model: str) -> tuple[str, float] | None:
        return self.index.search(scope, text, vector, model=model)

    def add(self, scope: str, key: str, text: str, vector: Any, *, model: str) -> None:
        """Index `key` (replacing what was indexed under it)."""
        self.remove(key)
        self.index.add(scope, key, text, vector, model=model)
        self._keys.add(key)

    def remove(self, key: str) -> None:
        if key in self._keys:
            self.index.remove(key)
            self._keys.discard(key)

    def to_bytes(self, vector: Any) -> bytes:
        return bytes(self._np.asarray(vector, dtype=_VECTOR_DTYPE).tobytes())

    def from_bytes(self, data: bytes) -> Any:
        return self._np.frombuffer(data, dtype=_VECTOR_DTYPE).copy()

    def stats(self) -> dict[str, Any]:
        return {
            "indexed": len(self._keys),
            "embedded_texts": self.embedded,
            "embed_calls": self.embed_calls,
            **self.index.stats(),
        }
