"""The engine at α equals Hugging Face transformers on the float32 reference merge at α.

Stated tolerance: greedy tokens identical; every log-probability the engine reports (the chosen
token's and its top alternatives') within 2e-4 of the reference's log-softmax, in float32.
"""
from __future__ import annotations

import pytest
from reference import ALPHAS, PROMPTS, decoded_merge_model, reference_greedy, reference_model, reference_prompt_log_probs

from expo_serve import LLM, SamplingParams
from expo_serve.delta.build import build_delta
from expo_serve.delta.sources import open_source

MAX_NEW = 10
LOGPROB_TOL = 2e-4

PAIRS = {
    "llama-tied": {"arch": "llama", "tie": True},
    "llama3-rope": {"arch": "llama3"},
    "mistral": {"arch": "mistral"},
    "mistral-window": {"arch": "mistral", "sliding_window": 6},
    "qwen2": {"arch": "qwen2"},
}


def _check_against_reference(pair, outs, tokenizer, alphas=ALPHAS, prompts=PROMPTS):
    for prompt, alpha, out in zip(prompts, alphas, outs):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        ref_tokens, ref_log_probs = reference_greedy(reference_model(*pair, alpha), ids, MAX_NEW)
        assert out.token_ids == ref_tokens, f"alpha={alpha}: greedy tokens differ from the reference merge"
        assert out.alpha == alpha
        for step, lp in enumerate(out.outputs[0].logprobs):
            assert abs(lp.logprob - float(ref_log_probs[step, lp.token_id])) < LOGPROB_TOL
            for token, value in lp.top:
                assert abs(value - float(ref_log_probs[step, token])) < LOGPROB_TOL


def _params(alpha, **kw):
    return SamplingParams(alpha=alpha, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=5, **kw)


@pytest.mark.parametrize("name", list(PAIRS))
def test_one_batch_mixing_alphas_matches_reference_merge(pairs, name):
    options = dict(PAIRS[name])
    pair = pairs(name, arch=options.pop("arch"), **options)
    llm = LLM(str(pair[0]), aligned=str(pair[1]))
    outs = llm.generate(PROMPTS, [_params(a) for a in ALPHAS])
    _check_against_reference(pair, outs, llm.tokenizer)


@pytest.mark.parametrize("encoding", ["dense", "int8", "lowrank"])
def test_delta_folder_serves_its_own_decoded_merge(pairs, tmp_path, encoding):
    """With a compact Δ the engine must equal the reference merge of the *decoded* Δ."""
    sft, aligned = pairs("qwen2")
    build_delta(open_source(sft), open_source(aligned), tmp_path / "d", encoding=encoding, rank=8, dtype="float32")
    llm = LLM(str(sft), delta=str(tmp_path / "d"))
    outs = llm.generate(PROMPTS[:2], [_params(a) for a in (0.3, 2.5)])
    for prompt, alpha, out in zip(PROMPTS[:2], (0.3, 2.5), outs):
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        ref_tokens, _ = reference_greedy(decoded_merge_model(sft, tmp_path / "d", alpha), ids, MAX_NEW)
        assert out.token_ids == ref_tokens


def test_prompt_logprobs_match_teacher_forcing(pairs):
    pair = pairs("llama-tied", arch="llama", tie=True)
    llm = LLM(str(pair[0]), aligned=str(pair[1]))
    ids = llm.tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    out = llm.generate([ids], SamplingParams(alpha=0.3, max_tokens=0, prompt_logprobs=3))[0]
    assert out.token_ids == [] and out.outputs[0].finish_reason == "length"
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    ref = reference_prompt_log_probs(reference_model(*pair, 0.3), ids)
    for p, lp in enumerate(out.prompt_logprobs[1:]):
        assert lp.token_id == ids[p + 1]
        assert abs(lp.logprob - float(ref[p, ids[p + 1]])) < LOGPROB_TOL
        assert [t for t, _ in lp.top] == ref[p].topk(3).indices.tolist()


def test_chunked_prefill_and_tiny_cache_change_nothing(pairs):
    """Chunks of 5 tokens and a cache so small that sequences are preempted: same tokens."""
    pair = pairs("mistral-window", arch="mistral", sliding_window=6)
    roomy = LLM(str(pair[0]), aligned=str(pair[1]))
    expected = [o.token_ids for o in roomy.generate(PROMPTS, [_params(a) for a in ALPHAS])]
    tight = LLM(str(pair[0]), aligned=str(pair[1]), max_num_batched_tokens=5, block_size=4, num_kv_blocks=16)
    got = tight.generate(PROMPTS, [_params(a) for a in ALPHAS])
    assert [o.token_ids for o in got] == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.block_manager.num_free == tight.engine.block_manager.num_blocks
