"""`expo-serve sweep` on tiny random Llama and Qwen2 pairs, against independent references: HF greedy on
the float32 reference merge at every α, the DPO implicit reward from the two HF models, and the
statistics recomputed directly from samples.jsonl."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from reference import reference_greedy, reference_model, reference_prompt_log_probs
from sweep_helpers import PROMPTS, read_samples, write_prompts

from expo_serve.alpha_sweep.grid import parse_alphas
from expo_serve.alpha_sweep.stats import RESAMPLES, bootstrap_interval, length_controlled_win_rate
from expo_serve.cli import main
from expo_serve.errors import ExpoError

ALPHAS = [-0.5, 0.0, 0.5, 1.5]
MAX_TOKENS = 10
BETA = 0.25


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def swept(request, pairs, tmp_path_factory):
    """One implicit-judge sweep per architecture; the Qwen2 one loads a delta folder instead of θ_aligned."""
    from expo_serve import sweep

    arch = request.param
    sft, aligned = pairs(arch)
    root = tmp_path_factory.mktemp(f"sweep-{arch}")
    source = {"aligned": str(aligned)}
    if arch == "qwen2":
        from expo_serve.delta.build import build_delta
        from expo_serve.delta.sources import open_source

        build_delta(open_source(sft), open_source(aligned), root / "delta", dtype="float32")
        source = {"delta": str(root / "delta")}
    result = sweep(str(sft), **source, prompts=str(write_prompts(root / "prompts.jsonl")), alphas="-0.5,0.5,1.5",
                   judge="implicit", out=str(root / "out"), max_tokens=MAX_TOKENS, beta=BETA)
    return sft, aligned, root / "out", result


def _chat_ids(tokenizer, prompt):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_every_answer_equals_hf_greedy_on_the_reference_merge(swept):
    from transformers import AutoTokenizer

    sft, aligned, out, _ = swept
    tokenizer = AutoTokenizer.from_pretrained(sft)
    samples = read_samples(out)
    assert sorted({s["alpha"] for s in samples}) == ALPHAS  # α = 0, the control, was added
    assert len(samples) == len(PROMPTS) * len(ALPHAS)
    for alpha in ALPHAS:
        model = reference_model(sft, aligned, alpha)
        for i, prompt in enumerate(PROMPTS):
            ours = next(s for s in samples if s["alpha"] == alpha and s["id"] == f"q{i}")
            expected, _ = reference_greedy(model, _chat_ids(tokenizer, prompt), MAX_TOKENS)
            got = ours["token_ids"]
            assert got == expected[: len(got)], f"alpha={alpha} prompt={i}"
            assert len(got) == MAX_TOKENS or got[-1] == tokenizer.eos_token_id, f"alpha={alpha} prompt={i}"
            assert ours["text"] == tokenizer.decode(got, skip_special_tokens=True)


def test_implicit_reward_equals_the_two_hf_models(swept):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft, aligned, out, _ = swept
    tokenizer = AutoTokenizer.from_pretrained(sft)
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (aligned, sft)]
    for s in read_samples(out):
        prompt = _chat_ids(tokenizer, PROMPTS[int(s["id"][1:])])
        ids = prompt + s["token_ids"]
        targets = torch.tensor(ids[len(prompt):])
        sums = [reference_prompt_log_probs(m, ids)[len(prompt) - 1:].gather(1, targets[:, None]).sum().item() for m in models]
        assert s["score"] == pytest.approx(BETA * (sums[0] - sums[1]), abs=1e-4), s


def _direct_bootstrap(values, seed=0):
    """The percentile bootstrap of the mean written out: resample prompts with replacement, take percentiles."""
    values = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(values), (RESAMPLES, len(values)))
    return tuple(np.percentile(values[idx].mean(axis=1), [2.5, 97.5]))


def test_results_match_a_direct_computation_from_the_samples(swept):
    _, _, out, result = swept
    samples = read_samples(out)
    results = json.loads((out / "results.json").read_text())
    rows = {r["alpha"]: r for r in results["per_alpha"]}
    assert [r["alpha"] for r in results["per_alpha"]] == ALPHAS
    control = {s["id"]: s for s in samples if s["alpha"] == 0.0}
    for alpha in ALPHAS:
        mine = sorted((s for s in samples if s["alpha"] == alpha), key=lambda s: int(s["id"][1:]))
        scores = [s["score"] for s in mine]
        wins = [0.5 if s["token_ids"] == control[s["id"]]["token_ids"] else float(s["score"] > control[s["id"]]["score"])
                for s in mine]
        lengths = [len(s["token_ids"]) for s in mine]
        row = rows[alpha]
        assert row["mean_score"] == pytest.approx(np.mean(scores), abs=1e-12)
        assert row["win_rate"] == pytest.approx(np.mean(wins), abs=1e-12)
        assert row["mean_length"] == pytest.approx(np.mean(lengths), abs=1e-12)
        for key, values in (("score", scores), ("win", wins), ("length", lengths)):
            low, high = _direct_bootstrap(values) if len(set(values)) > 1 else (values[0], values[0])
            assert (row[f"{key}_low"], row[f"{key}_high"]) == pytest.approx((low, high), abs=1e-9), (alpha, key)
        assert row["beats_control"] == (alpha != 0 and row["win_low"] > 0.5)
    assert results["recommended"]["alpha"] == result.recommendation.alpha
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("alpha,prompts,mean_score") and len(csv_lines) == 1 + len(ALPHAS)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert f"## Recommendation: α = {result.recommendation.alpha:g}" in report


def test_bootstrap_interval_matches_scipy_and_a_direct_computation():
    from scipy import stats

    values = np.random.default_rng(7).normal(size=23)
    ours = bootstrap_interval(values, seed=3)
    assert ours == pytest.approx(_direct_bootstrap(values, seed=3), abs=1e-12)
    scipy_ci = stats.bootstrap((values,), np.mean, n_resamples=RESAMPLES, method="percentile",
                               rng=np.random.default_rng(3)).confidence_interval
    assert ours == pytest.approx((scipy_ci.low, scipy_ci.high), abs=1e-12)
    # ...and it means what it says: the normal-theory interval is close for a mean of 23 normals.
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert ours == pytest.approx((values.mean() - half, values.mean() + half), abs=0.1)


def test_length_controlled_win_rate_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    diffs = rng.normal(20, 30, size=60).round()
    # Longer answers win more often; a few ties.
    prefs = np.where(rng.random(60) < 1 / (1 + np.exp(-(0.2 + diffs / 25))), 1.0, 0.0)
    prefs[:6] = 0.5
    ours = length_controlled_win_rate(prefs, diffs)
    # The same model in sklearn: a tie is a win and a loss of weight 1/2 each; C = 1/λ on the slope only.
    x = (diffs / diffs.std())[:, None]
    X = np.vstack([x, x])
    y = np.concatenate([np.ones(60), np.zeros(60)])
    w = np.concatenate([prefs, 1 - prefs])
    fit = LogisticRegression(C=1.0, tol=1e-10, max_iter=1000).fit(X, y, sample_weight=w)
    assert ours == pytest.approx(1 / (1 + np.exp(-fit.intercept_[0])), abs=1e-4)
    raw = prefs.mean()
    assert ours < raw  # the length advantage is taken out
    # With no length difference, the length-controlled win rate is the raw one.
    assert length_controlled_win_rate([1, 0.5, 1, 0, 1], [0] * 5) == pytest.approx(0.7, abs=1e-6)
    assert length_controlled_win_rate([1, 1, 1], [3, 1, 2]) > 0.999  # every pair won: bounded, not NaN


@pytest.mark.parametrize("spec, expected", [
    ("0,0.1,0.3,1", [0.0, 0.1, 0.3, 1.0]),
    ("1, 0.3,0.3, -0.5", [-0.5, 0.3, 1.0]),
    ("0:2:0.25", [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]),
    ("0:1:0.1", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),  # exact decimals, the end included
    ("0.5:0.6:0.25", [0.5]),
])
def test_alpha_grid(spec, expected):
    assert parse_alphas(spec) == expected


@pytest.mark.parametrize("spec", ["", "a,b", "0:1", "0:1:0", "1:0:0.1", "0:1000:0.01", "0,nan", "0,inf"])
def test_alpha_grid_refuses(spec):
    with pytest.raises(ExpoError):
        parse_alphas(spec)


# -- bad input: one clear sentence, a non-zero exit, nothing written -------------------------------

def _bad(capsys, tmp_path, *args):
    out = tmp_path / "out"
    assert main(["sweep", *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return [line for line in err if line.startswith("expo-serve: error:")][0]


@pytest.fixture
def tiny(pairs, tmp_path):
    sft, aligned = pairs("llama")
    return ["--sft", str(sft), "--aligned", str(aligned)], write_prompts(tmp_path / "prompts.jsonl")


def test_unknown_judge(capsys, tmp_path, tiny):
    model, prompts = tiny
    line = _bad(capsys, tmp_path, *model, "--prompts", str(prompts), "--alphas", "0,1", "--judge", "gpt4")
    assert line == ("expo-serve: error: Unknown judge 'gpt4'; use implicit, reward-model:PATH or "
                    "openai:URL[#MODEL].")


def test_empty_prompt_file(capsys, tmp_path, tiny):
    model, _ = tiny
    (tmp_path / "empty.jsonl").write_text("\n\n")
    line = _bad(capsys, tmp_path, *model, "--prompts", str(tmp_path / "empty.jsonl"), "--alphas", "0,1", "--judge", "implicit")
    assert line.endswith("empty.jsonl holds no prompts.")


def test_alpha_outside_the_served_range(capsys, tmp_path, tiny):
    model, prompts = tiny
    line = _bad(capsys, tmp_path, *model, "--prompts", str(prompts), "--alphas", "0,1,30", "--judge", "implicit")
    assert "α = 30 is outside the served range [-1, 25]" in line
    line = _bad(capsys, tmp_path, *model, "--prompts", str(prompts), "--alphas=-2,0", "--judge", "implicit")
    assert "α = -2 is outside the served range [-1, 25]" in line


def test_prompt_over_the_context_window(capsys, tmp_path, tiny):
    model, _ = tiny
    long_prompts = write_prompts(tmp_path / "long.jsonl", ["Hello", "word " * 300])
    line = _bad(capsys, tmp_path, *model, "--prompts", str(long_prompts), "--alphas", "0,1", "--judge", "implicit",
                "--max-tokens", "8")
    assert "Prompt 'q1' has" in line and "exceeds the context window of 256 tokens" in line


def test_greedy_with_several_samples_is_refused(capsys, tmp_path, tiny):
    model, prompts = tiny
    line = _bad(capsys, tmp_path, *model, "--prompts", str(prompts), "--alphas", "0,1", "--judge", "implicit", "--n", "3")
    assert "identical greedy answers" in line


def test_failure_while_writing_leaves_nothing(tmp_path, tiny, monkeypatch):
    from expo_serve.alpha_sweep import run

    def broken_plot(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run, "write_plot", broken_plot)
    model, prompts = tiny
    with pytest.raises(OSError):
        run.sweep(model[1], aligned=model[3], prompts=str(prompts), alphas="0,1", judge="implicit",
                  out=str(tmp_path / "out"), max_tokens=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_the_command_exits_non_zero(tmp_path):
    """The real process: the error on stderr, exit code 1 (here before any model is loaded)."""
    done = subprocess.run([sys.executable, "-m", "expo_serve", "sweep", "--sft", "x", "--aligned", "y", "--prompts",
                           str(write_prompts(tmp_path / "p.jsonl")), "--alphas", "0,1", "--judge", "bogus",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == ("expo-serve: error: Unknown judge 'bogus'; use implicit, reward-model:PATH or "
                                   "openai:URL[#MODEL].")
    assert not (tmp_path / "out").exists()


def test_heldout_prompts_ship_and_were_not_trained_on():
    from importlib.resources import files

    from expo_serve.alpha_sweep.prompts import load_prompts
    from expo_serve.demo.pair import load_preferences

    heldout = load_prompts(files("expo_serve") / "demo" / "data" / "heldout_prompts.jsonl")
    trained = {row["prompt"].strip().lower() for row in load_preferences()}
    assert len(heldout) == 32
    assert not {p.question.strip().lower() for p in heldout} & trained


def test_sampled_sweep_averages_samples_per_prompt_and_repeats_with_its_seed(pairs, tmp_path):
    from expo_serve import sweep

    sft, aligned = pairs("llama")
    prompts = str(write_prompts(tmp_path / "p.jsonl", PROMPTS[:3]))
    runs = [sweep(str(sft), aligned=str(aligned), prompts=prompts, alphas="1", judge="implicit", out=str(tmp_path / f"o{k}"),
                  n=2, temperature=0.9, seed=11, max_tokens=8) for k in range(2)]
    first, second = (read_samples(tmp_path / f"o{k}") for k in range(2))
    assert [s["token_ids"] for s in first] == [s["token_ids"] for s in second]  # the seed fixes every draw
    assert len(first) == 3 * 2 * 2 and {s["sample"] for s in first} == {0, 1}
    assert len({tuple(s["token_ids"]) for s in first}) > 3  # sampled, not greedy
    by = {(s["id"], s["alpha"], s["sample"]): s for s in first}
    wins = [np.mean([0.5 if by[(f"q{p}", 1.0, i)]["token_ids"] == by[(f"q{p}", 0.0, i)]["token_ids"]
                     else float(by[(f"q{p}", 1.0, i)]["score"] > by[(f"q{p}", 0.0, i)]["score"]) for i in range(2)])
            for p in range(3)]
    row = next(r for r in runs[0].stats if r.alpha == 1.0)
    assert row.win_rate == pytest.approx(np.mean(wins), abs=1e-12)
    assert (row.win_low, row.win_high) == pytest.approx(_direct_bootstrap(wins, seed=11) if len(set(wins)) > 1
                                                        else (wins[0], wins[0]), abs=1e-9)


def test_every_prompt_and_alpha_is_queued_before_the_first_step(pairs, tmp_path, monkeypatch):
    """One engine run: the whole grid is in the engine at its first step, α values mixed in it."""
    from expo_serve import sweep
    from expo_serve.engine.llm_engine import LLMEngine

    seen = []
    step = LLMEngine.step

    def spy(self):
        if not seen:
            seen.append(sorted((r.alpha for r in self.requests.values())))
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", spy)
    sft, aligned = pairs("llama")
    sweep(str(sft), aligned=str(aligned), prompts=str(write_prompts(tmp_path / "p.jsonl")), alphas="0.5,1,2",
          judge="implicit", out=str(tmp_path / "out"), max_tokens=4)
    assert seen[0] == sorted([0.0, 0.5, 1.0, 2.0] * len(PROMPTS))
