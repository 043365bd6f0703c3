"""Judges: what scores each answer. One small interface, so more can be added.

A pointwise judge gives every answer a number (higher is better). A pairwise judge compares each
answer with the α = 0 answer to the same prompt and sample index; its score is the preference for
the answer, in [0, 1] (0.5: a tie), and α = 0's own answers score 0.5.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

from ..errors import ExpoError
from .generate import Sample
from .prompts import Prompt

JUDGE_FORMS = "implicit, reward-model:PATH or openai:URL[#MODEL]"


class Judge(ABC):
    pairwise = False
    name = ""

    @abstractmethod
    def score(self, samples: list[Sample], prompts: list[Prompt], llm) -> None:
        """Set `score` on every sample (the engine `llm` is there for judges that use the pair itself)."""

    def describe(self) -> str:
        return self.name


def parse_judge(spec: str, *, beta: float = 0.1, device: str = "cpu") -> Judge:
    """The judge a --judge value names; checked before any model is loaded."""
    spec = (spec or "").strip()
    if spec == "implicit":
        from .implicit import ImplicitJudge

        if not math.isfinite(beta) or beta <= 0:
            raise ExpoError(f"--beta must be a positive number, got {beta:g}.")
        return ImplicitJudge(beta)
    if spec.startswith("reward-model:"):
        from .reward_model import RewardModelJudge

        path = Path(spec.removeprefix("reward-model:")).expanduser()
        if not (path / "config.json").is_file():
            raise ExpoError(f"The reward model {str(path)!r} is not a Hugging Face model folder (no config.json).")
        return RewardModelJudge(path, device)
    if spec.startswith("openai:"):
        from .openai_judge import OpenAIJudge

        url, _, model = spec.removeprefix("openai:").partition("#")
        if not url.startswith(("http://", "https://")):
            raise ExpoError(f"The judge URL {url!r} must start with http:// or https:// (e.g. openai:http://127.0.0.1:8000/v1).")
        return OpenAIJudge(url, model or None)
    raise ExpoError(f"Unknown judge {spec!r}; use {JUDGE_FORMS}.")
