"""The DPO implicit reward: the pair judges its own answers, with no extra model.

r(y|x) = β·(log π_aligned(y|x) − log π_sft(y|x)), the log-probabilities summed over the response
tokens. Both come from the same engine by teacher forcing [prompt | answer] as a prompt with
prompt logprobs at α = 0 (θ_aligned) and at α = −1 (θ_sft), in one engine run for every answer.
"""
from __future__ import annotations

from ..engine.request import SamplingParams
from .generate import Sample, run_requests
from .judges import Judge

ALIGNED, SFT = 0.0, -1.0


class ImplicitJudge(Judge):
    name = "implicit"

    def __init__(self, beta: float):
        self.beta = beta

    def describe(self) -> str:
        return f"implicit (DPO implicit reward, β = {self.beta:g})"

    def score(self, samples: list[Sample], prompts, llm) -> None:
        # All α = 0 requests, then all α = −1 ones: a batch mostly holds one α (see generate_grid).
        requests = [(s.prompt_ids + s.token_ids, SamplingParams(alpha=alpha, max_tokens=0, prompt_logprobs=0, temperature=0.0))
                    for alpha in (ALIGNED, SFT) for s in samples]
        outs = run_requests(llm, requests, "scoring (implicit reward)")
        for k, s in enumerate(samples):
            start = len(s.prompt_ids)  # prompt_logprobs[j] is log p(token j | tokens before it)
            aligned = sum(lp.logprob for lp in outs[k].prompt_logprobs[start:])
            sft = sum(lp.logprob for lp in outs[len(samples) + k].prompt_logprobs[start:])
            s.score = self.beta * (aligned - sft)
