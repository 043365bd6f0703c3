"""`expo-serve demo`: prepare the demo pair (cached), then show it at a few α values."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..paths import expo_home

SHOW_ALPHAS = (-1.0, 0.0, 0.3, 1.0)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def demo_delta(pair, home: Path | None = None) -> Path:
    """The demo pair's dense float32 delta, built once per θ_aligned (named by its recipe's hash,
    so a re-trained θ_aligned gets a fresh delta)."""
    import hashlib

    from ..delta.build import build_delta
    from ..delta.sources import open_source
    from .pair import RECIPE_FILE

    recipe = hashlib.sha256((pair.aligned_dir / RECIPE_FILE).read_bytes()).hexdigest()[:12]
    folder = (home or expo_home()) / "demo" / f"delta-dense-{recipe}"
    if not (folder / "expo_delta.json").is_file():
        _log(f"building the demo delta in {folder}")
        build_delta(open_source(pair.sft_dir), open_source(pair.aligned_dir), folder, dtype="float32")
    return folder


def show_answers(llm, prompts: list[str], alphas=SHOW_ALPHAS, max_tokens: int = 96) -> list[list[str]]:
    """Greedy answers, one batch mixing every α; printed prompt by prompt."""
    from ..engine.request import SamplingParams

    conversations = [[{"role": "user", "content": p}] for p in prompts for _ in alphas]
    params = [SamplingParams(alpha=a, max_tokens=max_tokens, temperature=0.0) for _ in prompts for a in alphas]
    started = time.perf_counter()
    outs = llm.chat(conversations, params)
    elapsed = time.perf_counter() - started
    answers = []
    for i, prompt in enumerate(prompts):
        print(f"\n### {prompt}")
        row = []
        for j, alpha in enumerate(alphas):
            text = outs[i * len(alphas) + j].text.strip()
            row.append(text)
            print(f"  α = {alpha:+.1f}  {text}")
        answers.append(row)
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"\n({len(outs)} requests in one batch, {tokens} tokens in {elapsed:.1f} s)")
    return answers


def run_demo():
    """Prepare the pair and its delta, print answers at α = -1, 0, 0.3, 1; return (pair, delta)."""
    from ..demo.pair import prepare_demo_pair
    from ..llm import LLM

    pair = prepare_demo_pair(log=_log)
    delta = demo_delta(pair)
    llm = LLM(str(pair.sft_dir), delta=str(delta))
    print("θ(α) = θ_sft + (1+α)·Δ: α = -1 is the SFT model, α = 0 the aligned one (made locally by a short DPO run).")
    show_answers(llm, pair.prompts)
    del llm  # the server loads its own engine
    return pair, delta
