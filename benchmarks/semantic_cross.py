"""Experiment: a fine-tuned cross-encoder as the semantic cache's second stage (not shipped).

all-MiniLM-L6-v2 from the model package reads `[CLS] query [SEP] candidate [SEP]`; a
linear head on its mean-pooled output gives P(same question). Trained on the train split
of `benchmarks/semantic_eval.py` only (same by-question split, same seed), with LoRA: the
base weights frozen, a rank-`rank` delta `B @ A` on every attention query/key/value/output
and feed-forward dense layer, plus the LayerNorms and the head; each pair's two texts
swapped at random; batches of similar length; seeded. At load the deltas are merged into
the base model (`W += B @ A * scale`) after checking the package weights' sha256. With
`--full`, every encoder weight is fine-tuned instead (the token embeddings stay frozen;
~21 MB of float16 `full.*` arrays, copied over the base model's at load).

Scored pair by pair on calib and report (`text_b` the query, `text_a` the candidate):
the hit rate at 0.5/1/2/5% false hits and the AUC of plain cosine, the shipped feature
MLP (`actors._semantic.Verifier`), the cross-encoder, and the sum of the MLP's and the
cross-encoder's logits (a fixed rule, nothing fitted on calib); and the cross-encoder's
cost per call (1 lookup of 1 candidate, of 4, and 64 lookups of 4 in one pass) at 1 and
2 torch threads. Results: `benchmarks/results/semantic_cross-*.json`; the figures and what
they mean are in BENCHMARKS.md, semantic_eval notes. The weights stay under
`.quotaflow/cache/semantic_eval/` (gitignored): they did not earn a place in the repo.

    nice -n 10 .venv/bin/python -m benchmarks.semantic_cross [--train] [--epochs 1]
        [--rank 8] [--lr 4e-4] [--max-length 64] [--threads 2] [--full] [--batch 32]

Training one epoch over the ~43k train pairs takes ~15-35 min on 2 shared cores (LoRA or
`--full` alike: the backward pass through every layer dominates).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from actors._semantic import MODEL_SHA256, Verifier, VerifierWeightsError, model_file, sha256_file
from benchmarks._common import REPO, machine, machine_summary, percentiles, stamp, write_json
from benchmarks.semantic_eval import (
    CACHE_DIR,
    Pairs,
    embed_all,
    features,
    load_data,
    split_by_question,
)

__all__ = [
    "CrossParams",
    "CrossVerifier",
    "add_lora",
    "main",
    "train_cross",
    "weight_arrays",
]

NAME = "semantic_cross"
SHARES: Final = (0.60, 0.15, 0.25)
FHRS: Final = (0.005, 0.01, 0.02, 0.05)
_SCORE_BATCH: Final = 64  # pairs per forward pass when scoring a split
_LOOKUPS: Final = 64  # lookups in one batched call timed
_CANDIDATES: Final = 4  # candidates per lookup (`actors._semantic.MAX_CANDIDATES`)


def load_base() -> tuple[Any, Any]:
    """(tokenizer, BertModel) of the model package, its weights' sha256 checked first."""
    path = model_file()
    digest = sha256_file(path)
    if digest != MODEL_SHA256:
        raise VerifierWeightsError(
            f"model weights {str(path)!r} have sha256 {digest}, expected {MODEL_SHA256}"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent))
    model = AutoModel.from_pretrained(str(path.parent))
    return tokenizer, model


def lora_target_names(model: Any) -> list[str]:
    """Names of the linear layers (in `model.named_modules()`) that carry a delta."""
    return [
        name
        for name, _ in model.named_modules()
        if name.startswith("encoder.layer.") and name.split(".", 3)[-1] in LORA_TARGETS
    ]


# The linear layers of each encoder block that carry a low-rank delta: attention
# query/key/value and output, and both dense layers of the feed-forward block.
LORA_TARGETS: Final = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
# Array names in the weights file besides the per-layer `lora.*` and `norm.*` ones.
_HEAD_KEYS: Final = ("head_w", "head_b", "scale", "max_length")


def _array(data: Any, key: str, path: Path) -> npt.NDArray[np.float32]:
    try:
        return np.asarray(data[key], dtype=np.float32)
    except KeyError as e:
        raise VerifierWeightsError(f"cross-encoder weights {str(path)!r} lack {key!r}") from e


class CrossVerifier:
    """P(same question) for (query, candidate) pairs, one forward pass per batch.

    Thread-safe (a lock serialises calls: the tokenizer is not safe to share); `threads`
    bounds torch's intra-op threads in this process (torch's setting is process-wide).
    """

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        self.path = path
        self._threads = threads
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._model: Any = None
        self._head_w: Any = None
        self._head_b: Any = None
        self.max_length = 0
        self._arrays = self._read(path)

    @staticmethod
    def _read(path: Path) -> dict[str, npt.NDArray[np.float32]]:
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = list(data.keys())
                return {k: _array(data, k, path) for k in keys}
        except (OSError, ValueError) as e:
            raise VerifierWeightsError(
                f"cross-encoder weights {str(path)!r} unreadable: {e}"
            ) from e

    def ensure_loaded(self) -> None:
        """Load the base model and merge the deltas (once; raises VerifierWeightsError)."""
        with self._lock:
            if self._model is None:
                self._build()

    def _build(self) -> None:
        import torch

        torch.set_num_threads(self._threads)
        arrays, path = self._arrays, self.path
        for key in _HEAD_KEYS:
            if key not in arrays:
                raise VerifierWeightsError(f"cross-encoder weights {str(path)!r} lack {key!r}")
        tokenizer, model = load_base()
        scale = float(arrays["scale"].reshape(-1)[0])
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        targets = set(lora_target_names(model))
        seen: set[str] = set()
        with torch.no_grad():
            for key, value in arrays.items():
                if key.startswith("lora.") and key.endswith(".A"):
                    name = key[len("lora.") : -len(".A")]
                    b = arrays.get(f"lora.{name}.B")
                    layer = modules.get(name)
                    if name not in targets or layer is None or b is None:
                        raise VerifierWeightsError(
                            f"cross-encoder weights {str(path)!r}: {key!r} names no target "
                            "layer or has no matching .B"
                        )
                    weight = layer.weight
                    fits = (
                        value.ndim == 2
                        and b.ndim == 2
                        and b.shape[1] == value.shape[0]
                        and (b.shape[0], value.shape[1]) == tuple(weight.shape)
                    )
                    if not fits:
                        raise VerifierWeightsError(
                            f"cross-encoder weights {str(path)!r}: {key!r} {value.shape} and "
                            f".B {b.shape} do not fit {name} {tuple(weight.shape)}"
                        )
                    weight += torch.from_numpy(b @ value * scale)
                    seen.add(name)
                elif key.startswith(("norm.", "full.")):
                    name = key[len("norm.") :]  # both prefixes are 5 characters
                    param = params.get(name)
                    if param is None or tuple(param.shape) != value.shape:
                        shape = None if param is None else tuple(param.shape)
                        raise VerifierWeightsError(
                            f"cross-encoder weights {str(path)!r}: {key!r} of shape "
                            f"{value.shape} does not fit the model's {name} ({shape})"
                        )
                    param.copy_(torch.from_numpy(value))
        full = any(k.startswith("full.") for k in arrays)
        if not full and seen != targets:
            raise VerifierWeightsError(
                f"cross-encoder weights {str(path)!r} carry deltas for {len(seen)} of "
                f"{len(targets)} target layers"
            )
        head_w = arrays["head_w"].reshape(-1)
        hidden = int(model.config.hidden_size)
        if head_w.shape != (hidden,):
            raise VerifierWeightsError(
                f"cross-encoder weights {str(path)!r}: head_w of shape {head_w.shape} does "
                f"not fit hidden size {hidden}"
            )
        model.eval()
        self._tokenizer = tokenizer
        self._model = model
        self._head_w = torch.from_numpy(head_w.copy())
        self._head_b = float(arrays["head_b"].reshape(-1)[0])
        self.max_length = int(arrays["max_length"].reshape(-1)[0])

    def probabilities_of(
        self, queries: Sequence[str], candidates: Sequence[str]
    ) -> npt.NDArray[np.float32]:
        """P(same question) of each (queries[i], candidates[i]), in one forward pass."""
        if len(queries) != len(candidates):
            raise ValueError(f"{len(queries)} queries but {len(candidates)} candidates")
        if not queries:
            return np.zeros(0, dtype=np.float32)
        import torch

        with self._lock:
            if self._model is None:
                self._build()
            enc = self._tokenizer(
                list(queries),
                list(candidates),
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                logits = pooled @ self._head_w + self._head_b
                probs = torch.sigmoid(logits)
        out: npt.NDArray[np.float32] = probs.numpy().astype(np.float32)
        return out


# -- training ---


@dataclass(frozen=True)
class CrossParams:
    seed: int = 7
    rank: int = 8
    alpha: float = 16.0
    epochs: int = 1
    batch: int = 32
    lr: float = 4e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    max_length: int = 64
    threads: int = 2
    # Fine-tune every encoder weight (the token embeddings stay frozen) instead of LoRA.
    full: bool = False
    # Batches are formed from this many shuffled pairs sorted by length.
    bucket: int = 32 * 64


def _lora_module(torch: Any, base: Any, rank: int, scale: float) -> Any:
    """`base` (a frozen nn.Linear) plus a trainable low-rank delta `B @ A * scale`."""

    class LoRALinear(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.base = base
            self.A = torch.nn.Parameter(torch.empty(rank, base.in_features))
            self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
            torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

        def forward(self, x: Any) -> Any:
            return self.base(x) + (x @ self.A.T @ self.B.T) * scale

    return LoRALinear()


def _batches(
    lengths: npt.NDArray[np.int64], p: CrossParams, rng: np.random.Generator
) -> list[npt.NDArray[np.int64]]:
    order = rng.permutation(lengths.size)
    out: list[npt.NDArray[np.int64]] = []
    for start in range(0, order.size, p.bucket):
        chunk = order[start : start + p.bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out.extend(chunk[i : i + p.batch] for i in range(0, chunk.size, p.batch))
    return [out[i] for i in rng.permutation(len(out))]


def train_cross(
    a_texts: Sequence[str], b_texts: Sequence[str], labels: npt.NDArray[np.int8], p: CrossParams
) -> tuple[dict[str, npt.NDArray[np.float32]], list[dict[str, Any]]]:
    """Train on pairs (a_texts[i], b_texts[i], labels[i]); the weights file's arrays + log."""
    import torch

    torch.manual_seed(p.seed)
    torch.set_num_threads(p.threads)
    rng = np.random.default_rng(p.seed)
    tokenizer, model = load_base()
    for prm in model.parameters():
        prm.requires_grad_(False)
    hidden = int(model.config.hidden_size)
    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    if p.full:
        scale = 1.0
        loras: dict[str, Any] = {}
        # Every encoder parameter is trained, and saved whole.
        tuned = {n: prm for n, prm in model.named_parameters() if n.startswith("encoder.")}
        for prm in tuned.values():
            prm.requires_grad_(True)
        # Weight decay on the weight matrices only, not on biases and LayerNorms.
        decays = {n: n.endswith("weight") and "LayerNorm" not in n for n in tuned}
        decayed = [prm for n, prm in tuned.items() if decays[n]]
        plain = [prm for n, prm in tuned.items() if not decays[n]]
        groups = [
            {"params": decayed, "lr": p.lr, "weight_decay": p.weight_decay},
            {"params": plain, "lr": p.lr, "weight_decay": 0.0},
        ]
    else:
        scale = p.alpha / p.rank
        loras = add_lora(model, p.rank, scale)
        tuned = {n: prm for n, prm in model.named_parameters() if "LayerNorm" in n}
        for prm in tuned.values():
            prm.requires_grad_(True)
        lora_params = [x for m in loras.values() for x in (m.A, m.B)]
        groups = [
            {"params": lora_params, "lr": p.lr, "weight_decay": p.weight_decay},
            {"params": list(tuned.values()), "lr": p.lr, "weight_decay": 0.0},
        ]
    groups.append({"params": list(head.parameters()), "lr": p.head_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    # Rough length of each pair in tokens, for bucketing only.
    lengths = np.array(
        [len(a.split()) + len(b.split()) for a, b in zip(a_texts, b_texts, strict=True)],
        dtype=np.int64,
    )
    steps = p.epochs * math.ceil(lengths.size / p.batch)
    warm = max(int(steps * p.warmup), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(steps - warm, 1)))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    y_all = torch.from_numpy(labels.astype(np.float32))
    log: list[dict[str, Any]] = []
    model.train()
    t0 = time.perf_counter()
    step = 0
    for epoch in range(p.epochs):
        total, seen = 0.0, 0
        for idx in _batches(lengths, p, rng):
            swap = rng.random(idx.size) < 0.5
            first = [b_texts[i] if s else a_texts[i] for i, s in zip(idx, swap, strict=True)]
            second = [a_texts[i] if s else b_texts[i] for i, s in zip(idx, swap, strict=True)]
            enc = tokenizer(
                first,
                second,
                truncation=True,
                max_length=p.max_length,
                padding=True,
                return_tensors="pt",
            )
            out = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
            pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            loss = loss_fn(head(pooled).squeeze(1), y_all[torch.from_numpy(idx)])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach()) * idx.size
            seen += idx.size
            if step % 100 == 0:
                el = time.perf_counter() - t0
                print(
                    f"cross epoch {epoch + 1} step {step}/{steps}: loss {total / seen:.4f} "
                    f"({el:.0f} s)",
                    flush=True,
                )
        log.append({"epoch": epoch + 1, "loss": round(total / max(seen, 1), 4)})
    prefix = "full." if p.full else "norm."
    return weight_arrays(loras, tuned, head, scale, p.max_length, prefix), log


def add_lora(model: Any, rank: int, scale: float) -> dict[str, Any]:
    """Wrap every target linear layer of `model` in a LoRA module; them by layer name."""
    import torch

    modules = dict(model.named_modules())
    loras: dict[str, Any] = {}
    for name in lora_target_names(model):
        parent_name, attr = name.rsplit(".", 1)
        lora = _lora_module(torch, modules[name], rank, scale)
        setattr(modules[parent_name], attr, lora)
        loras[name] = lora
    return loras


def weight_arrays(
    loras: dict[str, Any],
    norms: dict[str, Any],
    head: Any,
    scale: float,
    max_length: int,
    prefix: str = "norm.",
) -> dict[str, npt.NDArray[np.float32]]:
    """The weights file's arrays (what `CrossVerifier` reads): the LoRA factors, and each
    of `norms` whole under `prefix` (`norm.` beside LoRA, `full.` for a full fine-tune)."""
    arrays: dict[str, npt.NDArray[np.float32]] = {
        "scale": np.array([scale], np.float32),
        "max_length": np.array([max_length], np.float32),
        "head_w": head.weight.detach().numpy().reshape(-1).astype(np.float32),
        "head_b": head.bias.detach().numpy().reshape(-1).astype(np.float32),
    }
    for name, m in loras.items():
        arrays[f"lora.{name}.A"] = m.A.detach().numpy().astype(np.float32)
        arrays[f"lora.{name}.B"] = m.B.detach().numpy().astype(np.float32)
    for name, prm in norms.items():
        arrays[f"{prefix}{name}"] = prm.detach().numpy().astype(np.float32)
    return arrays


def export(arrays: dict[str, npt.NDArray[np.float32]], path: Path) -> None:
    """Write the arrays, the low-rank factors as float16 (halves the file), compressed."""
    out = {
        k: (v.astype(np.float16) if k.startswith(("lora.", "full.")) else v)
        for k, v in arrays.items()
    }
    np.savez_compressed(path, **out)  # type: ignore[arg-type]


# -- evaluation ---------------------------------------------------------------------------


def hit_rate_at(scores: npt.NDArray[Any], labels: npt.NDArray[np.int8], fhr: float) -> float:
    """Share of positives scored above the score that lets `fhr` of negatives through."""
    neg = np.sort(scores[labels == 0])
    cut = neg[min(math.ceil(neg.size * (1 - fhr)), neg.size - 1)]
    return float((scores[labels == 1] > cut).mean())


def auc(scores: npt.NDArray[Any], labels: npt.NDArray[np.int8]) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(mid, counts)
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _logit(p: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    q = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    out: npt.NDArray[np.float64] = np.log(q / (1 - q))
    return out


def score_split(
    verifier: CrossVerifier, texts: list[str], pairs: Pairs
) -> tuple[npt.NDArray[np.float32], float]:
    """Cross-encoder P(same) of (text_b, text_a) of every pair, longest first; seconds."""
    order = sorted(range(len(pairs)), key=lambda i: -len(texts[pairs.a[i]] + texts[pairs.b[i]]))
    out = np.empty(len(pairs), dtype=np.float32)
    t0 = time.perf_counter()
    for start in range(0, len(order), _SCORE_BATCH):
        idx = order[start : start + _SCORE_BATCH]
        out[idx] = verifier.probabilities_of(
            [texts[pairs.b[i]] for i in idx], [texts[pairs.a[i]] for i in idx]
        )
    return out, time.perf_counter() - t0


def cost(verifier: CrossVerifier, texts: list[str], pairs: Pairs, n: int) -> dict[str, Any]:
    """ms per call: 1 lookup of 1 candidate, of `_CANDIDATES`, `_LOOKUPS` lookups of them."""
    import torch

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        per: dict[str, Any] = {}
        for lookups, k, reps in ((1, 1, n), (1, _CANDIDATES, n), (_LOOKUPS, _CANDIDATES, 5)):
            times: list[float] = []
            for _ in range(reps):
                rows = rng.choice(len(pairs), size=(lookups, k))
                qs = [texts[int(pairs.b[r[0]])] for r in rows for _ in range(k)]
                cs = [texts[int(pairs.a[i])] for r in rows for i in r]
                t0 = time.perf_counter()
                verifier.probabilities_of(qs, cs)
                times.append((time.perf_counter() - t0) * 1e3)
            per[f"lookups_{lookups}x{k}_ms"] = percentiles(times)
        out[f"threads_{threads}"] = per
    return out


def run(p: CrossParams, weights: Path, train_now: bool, cost_n: int) -> dict[str, Any]:
    started = datetime.now()
    texts, pairs, data_sha = load_data()
    split = split_by_question(texts, pairs, SHARES, p.seed)
    train, calib, report = (pairs.subset(split == i) for i in range(3))
    log: list[dict[str, Any]] = []
    train_s = 0.0
    if train_now or not weights.exists():
        t0 = time.perf_counter()
        arrays, log = train_cross(
            [texts[i] for i in train.a.tolist()],
            [texts[i] for i in train.b.tolist()],
            train.label,
            p,
        )
        train_s = time.perf_counter() - t0
        weights.parent.mkdir(parents=True, exist_ok=True)
        export(arrays, weights)
    verifier = CrossVerifier(weights, threads=p.threads)
    vecs, _ = embed_all(texts, data_sha)
    mlp = Verifier.load()
    splits: dict[str, Any] = {}
    for name, s in (("calib", calib), ("report", report)):
        x = features(texts, vecs, s.a.tolist(), s.b.tolist())
        cross, seconds = score_split(verifier, texts, s)
        pm = mlp.probabilities_of(x)
        rules = {
            "cosine": x[:, 0],
            "mlp": pm,
            "cross": cross,
            "mlp_plus_cross_logits": _logit(pm) + _logit(cross),
        }
        splits[name] = {
            "pairs": len(s),
            "scoring_ms_per_pair": round(seconds / len(s) * 1e3, 3),
            "accuracy_at_0.5": {
                "mlp": round(float(((pm >= 0.5) == (s.label == 1)).mean()), 4),
                "cross": round(float(((cross >= 0.5) == (s.label == 1)).mean()), 4),
            },
            **{
                rule: {
                    "auc": round(auc(np.asarray(v), s.label), 4),
                    **{
                        f"hit_at_{f}": round(hit_rate_at(np.asarray(v), s.label, f), 4)
                        for f in FHRS
                    },
                }
                for rule, v in rules.items()
            },
        }
        print(name, splits[name], flush=True)
    return {
        "benchmark": NAME,
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "params": asdict(p),
        "weights": {
            "file": str(weights.relative_to(REPO)),
            "sha256": sha256_file(weights),
            "bytes": weights.stat().st_size,
            "trained_now": bool(log),
            "training_s": round(train_s, 1),
            "log": log,
        },
        "splits": splits,
        "cost": cost(verifier, texts, report, cost_n),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'split / rule':<32}{'auc':>7}" + "".join(f"{'@' + str(f):>9}" for f in FHRS)]
    for name, s in result["splits"].items():
        for rule in ("cosine", "mlp", "cross", "mlp_plus_cross_logits"):
            r = s[rule]
            lines.append(
                f"{name + ' ' + rule:<32}{r['auc']:>7.4f}"
                + "".join(f"{r[f'hit_at_{f}'] * 100:>8.1f}%" for f in FHRS)
            )
    for t, per in result["cost"].items():
        cells = ", ".join(f"{k[8:-3]} {v['p50']:.1f}" for k, v in per.items())
        lines.append(f"cross ms p50 ({t.replace('_', ' ')}): {cells}")
    lines.append(machine_summary(result["machine"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.semantic_cross", description=__doc__)
    ap.add_argument("--train", action="store_true", help="train even if the weights exist")
    ap.add_argument("--seed", type=int, default=CrossParams.seed)
    ap.add_argument("--epochs", type=int, default=CrossParams.epochs)
    ap.add_argument("--rank", type=int, default=CrossParams.rank)
    ap.add_argument("--lr", type=float, default=CrossParams.lr)
    ap.add_argument("--max-length", type=int, default=CrossParams.max_length)
    ap.add_argument("--threads", type=int, default=CrossParams.threads)
    ap.add_argument("--full", action="store_true", help="fine-tune every encoder weight")
    ap.add_argument("--batch", type=int, default=CrossParams.batch)
    ap.add_argument("--cost-n", type=int, default=50, help="calls per small cost series")
    ap.add_argument("--no-record", action="store_true", help="print only, write no JSON")
    a = ap.parse_args(argv)
    p = CrossParams(
        seed=a.seed,
        epochs=a.epochs,
        rank=a.rank,
        lr=a.lr,
        max_length=a.max_length,
        threads=a.threads,
        full=a.full,
        batch=a.batch,
    )
    kind = "full" if p.full else f"r{p.rank}"
    tag = f"s{p.seed}-{kind}-e{p.epochs}-lr{p.lr:g}-L{p.max_length}"
    result = run(p, CACHE_DIR / f"cross-{tag}.npz", a.train, a.cost_n)
    print(format_table(result))
    if not a.no_record:
        path = write_json(NAME, result, stamp(datetime.fromisoformat(result["started_at"])))
        print(f"results: {path.relative_to(REPO)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
