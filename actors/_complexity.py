"""The prompt complexity score that `routing.rules[].min_score` / `max_score` compare.

Five features, each in 0..1, from the request's `messages` alone (no model call):

* `length`: the prompt token estimate (`topics.tokens`) / `length_full_tokens`;
* `turns`: (user messages - 1) / (`turns_full` - 1): a long conversation needs context;
* `code`, `math`, `multi_step`: matches of that feature's cue regexes in the user
  messages' text / `cue_full`.

score = min(1, sum of weight x feature), weights from `routing.complexity.weights`, so a
weight is what that feature alone adds at full strength. Cheap on purpose: it runs in the
selector for every `auto` request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from topics.config import ComplexityConfig
from topics.tokens import estimate_prompt_tokens

__all__ = ["FEATURES", "Complexity", "ComplexityScorer"]

FEATURES = ("length", "code", "math", "multi_step", "turns")


class Complexity(msgspec.Struct, frozen=True):
    """A prompt's score and the features it came from (for logs, tests and tuning)."""

    score: float
    features: dict[str, float]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "\n".join(
            p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        )
    return ""


class ComplexityScorer:
    """Scores prompts with one `routing.complexity` config (regexes compiled once)."""

    def __init__(self, config: ComplexityConfig) -> None:
        self._cfg = config
        self._cues = {
            "code": [re.compile(p, re.MULTILINE) for p in config.code_cues],
            "math": [re.compile(p, re.MULTILINE) for p in config.math_cues],
            "multi_step": [re.compile(p, re.MULTILINE) for p in config.multi_step_cues],
        }
        w = config.weights
        self._weights = {
            "length": w.length,
            "code": w.code,
            "math": w.math,
            "multi_step": w.multi_step,
            "turns": w.turns,
        }

    def _cue_share(self, patterns: Sequence[re.Pattern[str]], text: str) -> float:
        full = self._cfg.cue_full
        hits = 0
        for pattern in patterns:
            for _ in pattern.finditer(text):
                hits += 1
                if hits >= full:
                    return 1.0
        return hits / full

    def score(self, messages: Sequence[Mapping[str, Any]]) -> Complexity:
        cfg = self._cfg
        user = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
        text = "\n".join(user)[-cfg.max_scan_chars :]
        features = {
            "length": min(1.0, estimate_prompt_tokens(messages) / cfg.length_full_tokens),
            "turns": min(1.0, max(0, len(user) - 1) / (cfg.turns_full - 1)),
        }
        for name, patterns in self._cues.items():
            features[name] = self._cue_share(patterns, text)
        total = sum(self._weights[f] * features[f] for f in FEATURES)
        return Complexity(
            score=round(min(1.0, total), 6),
            features={f: round(features[f], 6) for f in FEATURES},
        )
