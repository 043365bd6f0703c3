"""Every (prompt, α, sample) of the grid in one engine run: the engine batches across α per token row."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..engine.request import RequestOutput, SamplingParams
from ..errors import ExpoError
from .prompts import Prompt


@dataclass
class Sample:
    """One generated answer and, once judged, its score."""
    prompt_index: int
    prompt_id: str
    alpha: float
    sample: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    score: float | None = None
    verdicts: list[str] | None = field(default=None)  # a pairwise judge's raw answers, both orders

    def record(self) -> dict:
        row = {"id": self.prompt_id, "alpha": self.alpha, "sample": self.sample, "text": self.text,
               "token_ids": self.token_ids, "score": self.score}
        if self.verdicts is not None:
            row["verdicts"] = self.verdicts
        return row


@dataclass(frozen=True)
class Decoding:
    """The sampling options the sweep applies to every α alike."""
    n: int = 1
    temperature: float = 0.0
    max_tokens: int = 256
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def params(self, alpha: float, prompt_index: int) -> SamplingParams:
        # The same seeds at every α of a prompt: common random numbers, so the paired comparison
        # with α = 0 sees the effect of α rather than that of different draws.
        return SamplingParams(alpha=alpha, n=self.n, temperature=self.temperature, max_tokens=self.max_tokens,
                              top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty,
                              seed=None if self.temperature == 0 else self.seed + prompt_index * self.n)


def encode_prompts(llm, prompts: list[Prompt], max_tokens: int) -> list[list[int]]:
    """Each prompt through the model's chat template; refuses one that leaves no room for max_tokens."""
    window = llm.engine.max_model_len
    encoded = []
    for p in prompts:
        ids = llm.apply_chat_template(list(p.messages)) if llm.tokenizer.chat_template else \
            list(llm.tokenizer.encode(p.messages[-1]["content"], add_special_tokens=False))
        if len(ids) + max_tokens > window:
            raise ExpoError(f"Prompt {p.id!r} has {len(ids)} tokens, which with --max-tokens {max_tokens} exceeds "
                            f"the context window of {window} tokens.")
        encoded.append(ids)
    return encoded


def run_requests(llm, requests: list[tuple[list[int], SamplingParams]], desc: str, unit: str = "answer") -> list[RequestOutput]:
    """Queue every request, then step the engine until all are done, with a progress bar on stderr."""
    from tqdm import tqdm

    engine = llm.engine
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    total = sum(params.n for _, params in requests)
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        done = engine.run_to_completion(ids, on_finished=lambda out: bar.update(len(out.outputs)))
    return [done[i] for i in ids]


def generate_grid(llm, prompts: list[Prompt], prompt_ids: list[list[int]], alphas: list[float],
                  decoding: Decoding) -> list[Sample]:
    """All answers, ordered by prompt, then α, then sample index."""
    # Queued α by α: the running batch then holds few α values at a time, which on a CPU run as
    # plain products on the α cache's merged weights instead of the fused two-product path.
    keys = [(i, a) for a in alphas for i in range(len(prompts))]
    outs = run_requests(llm, [(prompt_ids[i], decoding.params(a, i)) for i, a in keys],
                        f"generating {len(prompts)} prompts × {len(alphas)} α × {decoding.n}")
    samples = []
    for (i, alpha), out in zip(keys, outs):
        for choice in out.outputs:
            samples.append(Sample(i, prompts[i].id, alpha, choice.index, prompt_ids[i], list(choice.token_ids),
                                  choice.text, choice.finish_reason))
    return sorted(samples, key=lambda s: (s.prompt_index, s.alpha, s.sample))
