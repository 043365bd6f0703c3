"""The offline Python API of DESIGN.md §5: LLM(...).generate / .chat with α per request."""
from __future__ import annotations

from typing import Sequence as Seq

from .engine.llm_engine import EngineConfig, LLMEngine
from .engine.request import RequestOutput, SamplingParams


class LLM:
    """θ_sft plus Δ (from `delta`, or computed from `aligned`), served with α per request.

    Without `delta` or `aligned` the model is served as it is (every Δ zero): that is how a
    merged checkpoint runs on the same engine.

    `tensor_parallel_size=N` splits W and Δ over N ranks: this process and N-1 worker processes
    it starts (one CUDA device each on CUDA, gloo on a CPU). `close()` (or a `with` block) stops
    them; so does the interpreter's exit. The workers are spawned, so a script that makes one needs
    the `if __name__ == "__main__":` guard.
    """

    def __init__(self, sft: str, delta: str | None = None, aligned: str | None = None, *, dtype: str = "float32",
                 device: str = "cpu", tensor_parallel_size: int = 1, **engine_options):
        self.engine = LLMEngine(EngineConfig(sft=sft, delta=delta, aligned=aligned, dtype=dtype, device=device,
                                             tensor_parallel_size=tensor_parallel_size, **engine_options))
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order; prompts are text or token ids. All run as one batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]
        done = self.engine.run_to_completion(ids)
        return [done[i] for i in ids]

    def chat(self, conversations: Seq[dict] | Seq[Seq[dict]],
             params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Like generate, for chat conversations formatted with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, params)

    def apply_chat_template(self, messages: Seq[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))
