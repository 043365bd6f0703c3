"""Rope scaling `linear` and `dynamic` (dynamic NTK) equal Hugging Face's LlamaForCausalLM.

Dynamic NTK rotates a sequence longer than max_position_embeddings (16 here) at a base computed
from its length: HF's single forward at the prompt's length, HF's generate at p+1 for the token
at position p. The engine follows the same rule per sequence (model/llama.py, RotaryEmbedding).
Tolerance as in test_engine_exactness.py: greedy tokens identical, log-probs within 2e-4.
"""
from __future__ import annotations

import pytest
from factories import make_config
from reference import ALPHAS, PROMPTS, reference_greedy, reference_model, reference_prompt_log_probs

from expo_serve import LLM, SamplingParams
from expo_serve.model.llama import RotaryEmbedding

LOGPROB_TOL = 2e-4
MAX_POS, WINDOW = 16, 64  # the llama-dynamic pair's max_position_embeddings and context window (16 × 4)


def _dynamic(pairs):
    return pairs("llama-dynamic", arch="llama-dynamic")


def _check_greedy(pair, outs, tokenizer, prompts, alphas, max_new):
    for prompt, alpha, out in zip(prompts, alphas, outs):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        ref_tokens, ref_log_probs = reference_greedy(reference_model(*pair, alpha), ids, max_new)
        assert out.token_ids == ref_tokens, f"alpha={alpha}: greedy tokens differ from the reference merge"
        for step, lp in enumerate(out.outputs[0].logprobs):
            assert abs(lp.logprob - float(ref_log_probs[step, lp.token_id])) < LOGPROB_TOL
            for token, value in lp.top:
                assert abs(value - float(ref_log_probs[step, token])) < LOGPROB_TOL


def _greedy(alpha, max_new):
    return SamplingParams(alpha=alpha, max_tokens=max_new, temperature=0.0, ignore_eos=True, logprobs=5)


def _prompt_log_probs(llm, ids, alpha=0.3):
    out = llm.generate([ids], SamplingParams(alpha=alpha, max_tokens=0, prompt_logprobs=3))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    return out.prompt_logprobs[1:]


def test_linear_scaling_mixing_alphas_matches_reference_merge(pairs):
    pair = pairs("llama-linear", arch="llama-linear")
    llm = LLM(str(pair[0]), aligned=str(pair[1]))
    outs = llm.generate(PROMPTS, [_greedy(a, 10) for a in ALPHAS])
    _check_greedy(pair, outs, llm.tokenizer, PROMPTS, ALPHAS, 10)


def test_dynamic_context_window_is_max_positions_times_factor(pairs):
    pair = _dynamic(pairs)
    llm = LLM(str(pair[0]), aligned=str(pair[1]))
    assert llm.engine.max_model_len == WINDOW
    assert llm.engine.loaded.model.model.rotary.cos.shape[0] == WINDOW


def test_dynamic_prompt_past_max_positions_matches_one_forward(pairs):
    pair = _dynamic(pairs)
    llm = LLM(str(pair[0]), aligned=str(pair[1]), max_model_len=WINDOW)
    ids = llm.tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    assert len(ids) > MAX_POS
    ref = reference_prompt_log_probs(reference_model(*pair, 0.3), ids)
    # Not vacuous: over the whole prompt HF rotates even the first positions at the scaled base.
    short = reference_prompt_log_probs(reference_model(*pair, 0.3), ids[:MAX_POS])
    assert (ref[:MAX_POS - 1] - short).abs().max() > 1e-3
    for p, lp in enumerate(_prompt_log_probs(llm, ids)):
        assert lp.token_id == ids[p + 1]
        assert abs(lp.logprob - float(ref[p, ids[p + 1]])) < LOGPROB_TOL
        assert [t for t, _ in lp.top] == ref[p].topk(3).indices.tolist()


def test_dynamic_prompt_in_chunks_equals_one_prefill(pairs):
    pair = _dynamic(pairs)
    whole = LLM(str(pair[0]), aligned=str(pair[1]), max_model_len=WINDOW)
    chunked = LLM(str(pair[0]), aligned=str(pair[1]), max_model_len=WINDOW, max_num_batched_tokens=5)
    ids = whole.tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    for one, split in zip(_prompt_log_probs(whole, ids), _prompt_log_probs(chunked, ids)):
        assert split.token_id == one.token_id
        assert abs(split.logprob - one.logprob) < 1e-5
        assert [t for t, _ in split.top] == [t for t, _ in one.top]


def test_dynamic_generation_across_max_positions_matches_hf_generate(pairs):
    """One batch: a prompt that crosses max_position_embeddings while generating (decode rows at
    p+1, beside rows still on the table), and two that start past it."""
    pair = _dynamic(pairs)
    llm = LLM(str(pair[0]), aligned=str(pair[1]), max_model_len=WINDOW)
    prompts, alphas, max_new = PROMPTS[1:], [0.3, 2.5, -1.0], 12
    outs = llm.generate(prompts, [_greedy(a, max_new) for a in alphas])
    _check_greedy(pair, outs, llm.tokenizer, prompts, alphas, max_new)


def test_unknown_rope_type_is_refused():
    """(A folder whose type transformers does not know is refused before this, by delta/sources.py.)"""
    config = make_config("llama")
    config.rope_parameters = {"rope_type": "bogus", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope scaling type 'bogus' is not supported"):
        RotaryEmbedding(config, MAX_POS, "cpu")


def test_dynamic_rope_lengths_reach_tensor_parallel_ranks(pairs):
    """Two ranks rotate a long prompt at the same scaled base (the lengths travel in the step message)."""
    pair = _dynamic(pairs)
    ids = LLM(str(pair[0]), aligned=str(pair[1])).tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    ref = reference_prompt_log_probs(reference_model(*pair, 0.3), ids)
    with LLM(str(pair[0]), aligned=str(pair[1]), max_model_len=WINDOW, tensor_parallel_size=2) as llm:
        for p, lp in enumerate(_prompt_log_probs(llm, ids)):
            assert abs(lp.logprob - float(ref[p, ids[p + 1]])) < LOGPROB_TOL
