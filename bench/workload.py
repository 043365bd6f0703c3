"""The benchmarks' shared workload (fixed seed): chat prompts of 63–231 tokens built from the
shipped preference texts, max_tokens 16–128, α drawn from three arms."""
from __future__ import annotations

import random
from dataclasses import dataclass

ARMS = (0.0, 0.3, 1.0)


@dataclass
class Request:
    messages: list[dict]
    prompt_ids: list[int]
    max_tokens: int
    alpha: float


def make_workload(tokenizer, n: int, seed: int, corpus: list[str]) -> list[Request]:
    """Chat prompts of 63–231 tokens (sentences drawn from the corpus), max_tokens 16–128, α per arm."""
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        target = rng.randint(63, 231)
        words: list[str] = []
        while True:
            words.append(rng.choice(corpus))
            messages = [{"role": "user", "content": "Summarize this: " + " ".join(words)}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) >= target:
                break
        requests.append(Request(messages, ids, rng.randint(16, 128), rng.choice(ARMS)))
    return requests
