"""`expo-serve sweep` / `expo_serve.sweep(...)`: prompts × α grid × samples in one engine run, judged,
summarized, and written to an output folder that appears complete or not at all."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..atomic_dir import atomic_output_dir, check_output_dir
from ..errors import ExpoError
from .generate import Decoding, encode_prompts, generate_grid
from .grid import check_range, parse_alphas, with_control
from .judges import parse_judge
from .prompts import load_prompts
from .report import Recommendation, ranked, recommend, table, write_markdown, write_plot, write_results
from .stats import AlphaStats, per_alpha

IMPLICIT_NOTE = ("- The implicit judge is the pair itself: β·log π_aligned/π_sft rises along the direction ExPO "
                 "extrapolates, so it tends to favour larger α by construction. Confirm its pick with an "
                 "independent judge (a reward model or an LLM judge) or live.\n")


@dataclass
class SweepResult:
    out: Path
    stats: list[AlphaStats]
    recommendation: Recommendation
    arms: list[float]
    summary: str  # what the command prints


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sweep(sft: str, *, prompts: str, alphas: str | Sequence[float], judge: str, out: str,
          delta: str | None = None, aligned: str | None = None, n: int = 1, arms: int = 2,
          temperature: float = 0.0, max_tokens: int = 256, beta: float = 0.1, top_p: float = 1.0,
          top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0,
          alpha_min: float = -1.0, alpha_max: float = 25.0, device: str = "cpu", dtype: str = "float32",
          max_model_len: int | None = None, max_num_seqs: int = 64, trust_remote_code: bool = False,
          log: Callable[[str], None] = _log) -> SweepResult:
    """Generate every (prompt, α, sample) in one batched engine run, judge the answers, and write
    samples.jsonl, results.json, results.csv, report.md, sweep.png and experiments.yaml to `out`."""
    from ..engine.request import AlphaRange, InvalidRequest

    # Everything that can be checked without a model is checked first.
    check_output_dir(out)
    if (delta is None) == (aligned is None):
        raise ExpoError("Give exactly one of --delta and --aligned.")
    grid = with_control(parse_alphas(alphas) if isinstance(alphas, str) else sorted({float(a) for a in alphas}))
    if not alpha_min <= 0.0 <= alpha_max:
        raise ExpoError(f"The served range [{alpha_min:g}, {alpha_max:g}] must contain α = 0, the control.")
    check_range(grid, alpha_min, alpha_max)
    the_judge = parse_judge(judge, beta=beta, device=device)
    for name, value in (("--n", n), ("--arms", arms), ("--max-tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExpoError(f"{name} must be a positive integer, got {value!r}.")
    if n > 1 and temperature == 0:
        raise ExpoError(f"--n {n} with --temperature 0 would give {n} identical greedy answers; set --temperature above 0.")
    questions = load_prompts(prompts)
    try:
        decoding = Decoding(n=n, temperature=temperature, max_tokens=max_tokens, top_p=top_p, top_k=top_k,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
        decoding.params(0.0, 0)  # SamplingParams judges the options now, not after the model loads
    except InvalidRequest as exc:
        raise ExpoError(f"Invalid sampling option: {exc}.") from None

    from ..llm import LLM

    log(f"loading {sft} with {'Δ ' + delta if delta else 'θ_aligned ' + str(aligned)}")
    # α = −1 (θ_sft) is always served: the implicit judge scores with it.
    llm = LLM(sft, delta=delta, aligned=aligned, dtype=dtype, device=device, max_model_len=max_model_len,
              max_num_seqs=max_num_seqs, alpha=AlphaRange(0.0, min(alpha_min, -1.0), alpha_max),
              trust_remote_code=trust_remote_code)
    prompt_ids = encode_prompts(llm, questions, max_tokens)
    try:
        start = time.perf_counter()
        samples = generate_grid(llm, questions, prompt_ids, grid, decoding)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        the_judge.score(samples, questions, llm)
        judge_s = time.perf_counter() - start
    except InvalidRequest as exc:
        raise ExpoError(f"The engine refused a request: {exc}.") from None

    stats = per_alpha(samples, grid, len(questions), the_judge.pairwise, seed=seed)
    rec = recommend(stats)
    arm_alphas = [s.alpha for s in ranked(stats)[:arms]]
    tokens = sum(len(s.token_ids) for s in samples)
    meta = {
        "prompt_file": str(prompts), "prompts": len(questions), "samples_per_prompt": n,
        "alphas": grid, "judge": the_judge.describe(), "sft": str(sft), "delta": delta, "aligned": aligned,
        "decoding": f"temperature {temperature:g}" + (", greedy" if temperature == 0 else f", seed {seed}")
                    + f", at most {max_tokens} tokens",
        "sampling": asdict(decoding),
        "preference": ("The judge compared the two answers in both orders; the preference is the mean of the two verdicts "
                       "(a reply that names neither answer counts as a tie)."
                       if the_judge.pairwise else "The answer with the higher score wins."),
        "judge_note": IMPLICIT_NOTE if the_judge.name == "implicit" else "",
        "timing": {"generate_s": round(generate_s, 2), "judge_s": round(judge_s, 2), "generated_tokens": tokens,
                   "generate_tokens_per_s": round(tokens / generate_s, 2) if generate_s > 0 else None},
    }

    with atomic_output_dir(out) as tmp:
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s.record(), ensure_ascii=False) + "\n")
        write_results(tmp, stats, rec, meta)
        write_markdown(tmp, stats, rec, meta, arm_alphas)
        write_plot(tmp / "sweep.png", stats, rec, the_judge.name)
        from .experiments_file import write_experiments

        write_experiments(tmp / "experiments.yaml", [s for s in stats if s.alpha in arm_alphas], the_judge.name)

    summary = (f"{table(stats, rec.alpha)}\n\nrecommended α = {rec.alpha:g}: {rec.reason}\n"
               f"generated {tokens} tokens in {generate_s:.1f} s ({tokens / max(generate_s, 1e-9):.1f} tokens/s), "
               f"judged in {judge_s:.1f} s\n"
               f"wrote {out}: samples.jsonl, results.json, results.csv, report.md, sweep.png, experiments.yaml "
               f"(control + α = {', '.join(f'{a:g}' for a in arm_alphas)})")
    return SweepResult(Path(out), stats, rec, arm_alphas, summary)
