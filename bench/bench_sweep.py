"""`expo-serve sweep` against the user's alternative, side by side in one run (issue 14). A benchmark, never a test.

Workload: the held-out demo prompts (expo_serve/demo/data/heldout_prompts.jsonl) × K α values, greedy,
at most --max-tokens tokens an answer, judged by the DPO implicit reward (β = 0.1) in both paths.

  (a) what users do today, for each α: `expo-serve merge` (a process, as typed), load the merged
      checkpoint in Hugging Face transformers, `generate` in static batches of --batch-size
      (left-padded; a batch runs until its longest answer is done); then score every answer with the
      implicit reward: θ_sft and θ_aligned loaded once, each answer teacher-forced through both.
  (b) one `expo-serve sweep --judge implicit` process over the same grid (θ_sft + Δ, α per request,
      one engine run to generate, one to score), writing its whole report.

Both start from the same delta folder and include their processes' start and model loads.
Useful tokens/s = tokens of the answers kept / wall time. The script prints each phase, both walls,
and (a)/(b), plus how many answers the two paths agree on token for token.

    python bench/bench_sweep.py                  # K = 8 (0:1.75:0.25) × 32 prompts, 64 tokens, the demo pair
    python bench/bench_sweep.py --quick          # 2 α × 4 prompts × 8 tokens: checks that it runs
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ROOT / "expo_serve" / "demo" / "data" / "heldout_prompts.jsonl"
BETA = 0.1


def chat_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def hf_generate(model, tokenizer, prompt_ids, max_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy answers in static, left-padded batches; each answer cut after its first EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    answers = []
    for lo in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[lo:lo + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=eos)
        for row in out[:, width:].tolist():
            answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


def hf_response_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Σ log π(answer | prompt) for each (prompt, answer), right-padded batches."""
    sums = []
    for lo in range(0, len(pairs), batch_size):
        batch = pairs[lo:lo + batch_size]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
        with torch.inference_mode():
            logp = model(ids, attention_mask=mask).logits.float().log_softmax(-1)
        for i, (p, a) in enumerate(batch):
            rows = logp[i, len(p) - 1: len(p) + len(a) - 1]
            sums.append(rows.gather(1, torch.tensor(a)[:, None]).sum().item())
    return sums


def run_user_path(sft: Path, aligned: Path, delta: Path, prompts: list[str], alphas: list[float], max_tokens: int,
                  batch_size: int, work: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    phases = {"merge": 0.0, "load": 0.0, "generate": 0.0, "score": 0.0}
    start = time.perf_counter()
    answers: dict[float, list[list[int]]] = {}
    prompt_ids = None
    for alpha in alphas:
        out = work / f"merged-{alpha:g}"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "expo_serve", "merge", "--sft", str(sft), "--delta", str(delta),
                        "--alpha", str(alpha), "--out", str(out)], check=True, capture_output=True)
        phases["merge"] += time.perf_counter() - t
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(out)
        tokenizer.padding_side = "left"
        prompt_ids = prompt_ids or chat_ids(tokenizer, prompts)
        phases["load"] += time.perf_counter() - t
        t = time.perf_counter()
        answers[alpha] = hf_generate(model, tokenizer, prompt_ids, max_tokens, batch_size)
        phases["generate"] += time.perf_counter() - t
        del model
    t = time.perf_counter()
    pairs = [(prompt_ids[i], a) for alpha in alphas for i, a in enumerate(answers[alpha])]
    sums = []
    for folder in (aligned, sft):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        sums.append(hf_response_logprobs(model, pairs, batch_size))
        del model
    flat = iter(BETA * (a - s) for a, s in zip(*sums))
    scores = {alpha: [next(flat) for _ in answers[alpha]] for alpha in alphas}
    phases["score"] = time.perf_counter() - t
    wall = time.perf_counter() - start
    return {"wall_s": wall, "phases_s": phases, "answers": answers, "scores": scores,
            "tokens": sum(len(a) for v in answers.values() for a in v)}


def run_sweep_path(sft: Path, delta: Path, prompt_file: Path, alphas: list[float], max_tokens: int, work: Path) -> dict:
    out = work / "sweep"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "expo_serve", "sweep", "--sft", str(sft), "--delta", str(delta),
                           "--prompts", str(prompt_file), "--alphas", ",".join(f"{a:g}" for a in alphas),
                           "--judge", "implicit", "--beta", str(BETA), "--max-tokens", str(max_tokens), "--out", str(out)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the sweep failed:\n{done.stderr[-3000:]}")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    answers: dict[float, list[list[int]]] = {}
    scores: dict[float, list[float]] = {}
    for s in samples:  # ordered by prompt, then α
        answers.setdefault(s["alpha"], []).append(s["token_ids"])
        scores.setdefault(s["alpha"], []).append(s["score"])
    timing = json.loads((out / "results.json").read_text())["timing"]
    return {"wall_s": wall, "timing": timing, "answers": answers, "scores": scores,
            "tokens": sum(len(s["token_ids"]) for s in samples),
            "printed": done.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", default="0:1.75:0.25", help="the grid, as for `expo-serve sweep` (default: 8 values)")
    parser.add_argument("--prompts", type=int, default=32, help="how many held-out prompts (default: all 32)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="HF generate's static batch (default: 16)")
    parser.add_argument("--quick", action="store_true", help="2 α × 4 prompts × 8 tokens: check that it runs")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.alphas, args.prompts, args.max_tokens = "0,1", 4, 8

    from expo_serve.alpha_sweep.grid import parse_alphas, with_control
    from expo_serve.demo.pair import prepare_demo_pair
    from expo_serve.demo.run import demo_delta

    alphas = with_control(parse_alphas(args.alphas))
    pair = prepare_demo_pair(log=lambda m: print(m, file=sys.stderr))
    delta = demo_delta(pair)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()][: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompt_file = work / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"bench_sweep: K = {len(alphas)} α ({', '.join(f'{a:g}' for a in alphas)}) × {len(rows)} prompts, "
              f"greedy, ≤ {args.max_tokens} tokens, implicit judge; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {platform.machine()}", flush=True)
        user = run_user_path(pair.sft_dir, pair.aligned_dir, delta, [r["prompt"] for r in rows], alphas,
                             args.max_tokens, args.batch_size, work)
        ph = user["phases_s"]
        print(f"(a) merge + load + HF generate (batches of {args.batch_size}) + score, per α: {user['wall_s']:.1f} s wall, "
              f"{user['tokens']} tokens, {user['tokens'] / user['wall_s']:.1f} tokens/s "
              f"[merge {ph['merge']:.1f} s, load {ph['load']:.1f} s, generate {ph['generate']:.1f} s, score {ph['score']:.1f} s]",
              flush=True)
        ours = run_sweep_path(pair.sft_dir, delta, prompt_file, alphas, args.max_tokens, work)

    both = [(alpha, i) for alpha in alphas for i, (a, b) in enumerate(zip(user["answers"][alpha], ours["answers"][alpha]))
            if a == b]
    same = len(both)
    # The same judge on the same answer: HF's implicit reward against the sweep's, as a check of the pairing.
    score_gap = max((abs(user["scores"][a][i] - ours["scores"][a][i]) for a, i in both), default=float("nan"))
    total = len(alphas) * len(rows)
    print(f"(b) one expo-serve sweep: {ours['wall_s']:.1f} s wall, {ours['tokens']} tokens, "
          f"{ours['tokens'] / ours['wall_s']:.1f} tokens/s [generate {ours['timing']['generate_s']:.1f} s, "
          f"judge {ours['timing']['judge_s']:.1f} s, the rest: process start, load, report]")
    print(f"(a)/(b) = {user['wall_s'] / ours['wall_s']:.2f}; answers identical token for token in both paths: {same}/{total}; "
          f"largest implicit-reward difference on those: {score_gap:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "alphas": alphas, "prompts": len(rows), "max_tokens": args.max_tokens, "batch_size": args.batch_size,
            "a_wall_s": user["wall_s"], "a_phases_s": ph, "a_tokens": user["tokens"],
            "b_wall_s": ours["wall_s"], "b_timing": ours["timing"], "b_tokens": ours["tokens"],
            "ratio_a_over_b": user["wall_s"] / ours["wall_s"], "identical_answers": same, "answers": total,
            "max_score_gap": score_gap,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
