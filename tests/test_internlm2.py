"""InternLM2 pairs, read from their own checkpoint layout, equal HF Llama on the converted weights.

The pair is a tiny random Llama pair (GQA, 4 query heads per key/value head) written in InternLM2's
layout by the inverse of the published conversion (tests/internlm2_pair.py). The reference is HF
transformers' LlamaForCausalLM on the float32 reference merge of the Llama folders, with the
tolerance of test_engine_exactness: greedy tokens identical, log-probabilities within 2e-4.
"""
from __future__ import annotations

import json

import pytest
import torch
from internlm2_pair import REMOTE_CODE, llama_config, read_as_llama, save_pair
from reference import ALPHAS, PROMPTS, decoded_merge_model, reference_greedy, reference_model, reference_prompt_log_probs
from safetensors.torch import load_file, save_file

from expo_serve import LLM, SamplingParams
from expo_serve.delta.build import build_delta
from expo_serve.delta.merge import merge
from expo_serve.delta.sources import open_source
from expo_serve.delta.store import DeltaCheckpoint
from expo_serve.errors import ExpoError

MAX_NEW = 8
LOGPROB_TOL = 2e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("internlm2"), bias=True)


def _params(alpha):
    return SamplingParams(alpha=alpha, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=5)


def _check(outs, tokenizer, reference_at):
    for prompt, alpha, out in zip(PROMPTS, ALPHAS, outs):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        ref_tokens, ref_log_probs = reference_greedy(reference_at(alpha), ids, MAX_NEW)
        assert out.token_ids == ref_tokens, f"alpha={alpha}: greedy tokens differ from HF Llama on the reference merge"
        for step, lp in enumerate(out.outputs[0].logprobs):
            assert abs(lp.logprob - float(ref_log_probs[step, lp.token_id])) < LOGPROB_TOL
            for token, value in lp.top:
                assert abs(value - float(ref_log_probs[step, token])) < LOGPROB_TOL


def test_source_reads_internlm2_as_llama(pair):
    source = open_source(pair["sft"])
    assert source.architecture == "InternLM2ForCausalLM"
    assert source.config.num_key_value_heads == 2 and source.config.attention_bias
    llama = {n: p for n, p in load_file(str(pair["llama-sft"] / "model.safetensors")).items()}
    assert sorted(source.parameter_names) == sorted(llama)
    for name, tensor in llama.items():
        assert torch.equal(source.get(name), tensor), name
        assert source.shape(name) == tuple(tensor.shape)


def test_aligned_model_serves_every_alpha_like_llama(pair):
    llm = LLM(str(pair["sft"]), aligned=str(pair["aligned"]))
    outs = llm.generate(PROMPTS, [_params(a) for a in ALPHAS])
    _check(outs, llm.tokenizer, lambda a: reference_model(pair["llama-sft"], pair["llama-aligned"], a))


@pytest.mark.parametrize("encoding", ["dense", "int8", "int4", "bit", "lowrank"])
def test_delta_folder_in_every_encoding_serves_its_decoded_merge(pair, tmp_path, encoding):
    manifest = build_delta(open_source(pair["sft"]), open_source(pair["aligned"]), tmp_path / "d", encoding=encoding,
                           rank=8, group_size=32, dtype="float32")
    assert manifest["architecture"] == "InternLM2ForCausalLM"
    assert "wqkv" in manifest["layout"]["tensors"]  # the manifest says the parts were encoded apart
    llm = LLM(str(pair["sft"]), delta=str(tmp_path / "d"))
    outs = llm.generate(PROMPTS, [_params(a) for a in ALPHAS])
    # Δ is stored under Llama names, so the HF Llama folder takes the decoded Δ as it is.
    _check(outs, llm.tokenizer, lambda a: decoded_merge_model(pair["llama-sft"], tmp_path / "d", a))


def test_merge_writes_internlm2_that_converts_to_the_llama_reference_bit_for_bit(pair, tmp_path):
    alpha = 0.5
    build_delta(open_source(pair["sft"]), open_source(pair["aligned"]), tmp_path / "d", dtype="float32")
    merge(open_source(pair["sft"]), DeltaCheckpoint(tmp_path / "d"), alpha, tmp_path / "merged")
    merged = tmp_path / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "internlm2" and config["architectures"] == ["InternLM2ForCausalLM"]
    for name in REMOTE_CODE:
        assert (merged / name).read_text() == (pair["aligned"] / name).read_text()
    stored = load_file(str(next(merged.glob("*.safetensors"))))
    assert any(".attention.wqkv." in name for name in stored) and not any("q_proj" in name for name in stored)

    got = read_as_llama(merged, llama_config(bias=True))
    sft = load_file(str(pair["llama-sft"] / "model.safetensors"))
    aligned = load_file(str(pair["llama-aligned"] / "model.safetensors"))
    assert sorted(got) == sorted(sft)
    for name in sft:
        expected = sft[name] + (1.0 + alpha) * (aligned[name] - sft[name])
        assert torch.equal(got[name], expected), name
    # The merged checkpoint serves again as a plain InternLM2 model: α changes nothing there.
    out = LLM(str(merged)).generate(PROMPTS[:1], _params(0.0))[0]
    ids = out.prompt_token_ids
    ref_tokens, _ = reference_greedy(reference_model(pair["llama-sft"], pair["llama-aligned"], alpha), ids, MAX_NEW)
    assert out.token_ids == ref_tokens


def test_pair_without_bias_serves_like_llama(tmp_path):
    pair = save_pair(tmp_path, bias=False, seed=3)
    assert not open_source(pair["sft"]).config.attention_bias
    llm = LLM(str(pair["sft"]), aligned=str(pair["aligned"]))
    outs = llm.generate(PROMPTS, [_params(a) for a in ALPHAS])
    _check(outs, llm.tokenizer, lambda a: reference_model(pair["llama-sft"], pair["llama-aligned"], a))


def test_wqkv_of_the_wrong_size_is_one_sentence_at_load(pair, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pair["sft"], broken)
    state = load_file(str(broken / "model.safetensors"))
    state["model.layers.1.attention.wqkv.weight"] = state["model.layers.1.attention.wqkv.weight"][:-8].clone()
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExpoError, match=r"model\.layers\.1\.attention\.wqkv\.weight is \[88, 64\].*8 query and 2 "
                                        r"key/value heads.*make \[96, 64\]: the weights do not match config.json"):
        LLM(str(broken), aligned=str(pair["aligned"]))


def test_unknown_rope_scaling_is_refused_in_one_sentence(pair, tmp_path):
    import shutil

    folder = tmp_path / "yarn"
    shutil.copytree(pair["sft"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExpoError, match="rope_scaling .*yarn.* is not a type expo-serve implements for InternLM2 "
                                        r"\(it reads dynamic and linear\)"):
        open_source(folder).config


def test_tokenizer_code_runs_only_with_trust_remote_code(tmp_path):
    pair = save_pair(tmp_path, fast_tokenizer=False)
    with pytest.raises(ExpoError, match="pass --trust-remote-code"):
        LLM(str(pair["sft"]), aligned=str(pair["aligned"]))
    with pytest.raises(ExpoError, match="pass --trust-remote-code"):
        build_delta(open_source(pair["sft"]), open_source(pair["aligned"]), tmp_path / "d")
    llm = LLM(str(pair["sft"]), aligned=str(pair["aligned"]), trust_remote_code=True)
    assert type(llm.tokenizer).__name__.startswith("InternLM2Tokenizer")  # the folder's own class ran
    out = llm.generate(PROMPTS[:1], _params(0.3))[0]
    ids = llm.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    ref_tokens, _ = reference_greedy(reference_model(pair["llama-sft"], pair["llama-aligned"], 0.3), ids, MAX_NEW)
    assert out.token_ids == ref_tokens


@pytest.mark.parametrize("scaling,max_positions", [({"type": "linear", "factor": 2.0}, 64),
                                                   ({"type": "dynamic", "factor": 4.0}, 16)])
def test_rope_scaling_matches_llama_with_the_same_scaling(tmp_path, scaling, max_positions):
    """Linear scaling acts at every position; dynamic past max_position_embeddings (16: the prompts
    and answers run past it, in a window of 16 × 4)."""
    pair = save_pair(tmp_path, rope_scaling=scaling, max_positions=max_positions)
    llm = LLM(str(pair["sft"]), aligned=str(pair["aligned"]))
    assert llm.engine.max_model_len == 64
    outs = llm.generate(PROMPTS, [_params(a) for a in ALPHAS])
    _check(outs, llm.tokenizer, lambda a: reference_model(pair["llama-sft"], pair["llama-aligned"], a))


def test_dynamic_ntk_prompt_past_max_positions_scores_as_one_forward(tmp_path):
    pair = save_pair(tmp_path, rope_scaling={"type": "dynamic", "factor": 4.0}, max_positions=16)
    llm = LLM(str(pair["sft"]), aligned=str(pair["aligned"]))
    ids = llm.tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    assert len(ids) > 16
    out = llm.generate([ids], SamplingParams(alpha=0.5, max_tokens=0, prompt_logprobs=3))[0]
    ref = reference_prompt_log_probs(reference_model(pair["llama-sft"], pair["llama-aligned"], 0.5), ids)
    for p, lp in enumerate(out.prompt_logprobs[1:]):
        assert abs(lp.logprob - float(ref[p, ids[p + 1]])) < LOGPROB_TOL
        assert [t for t, _ in lp.top] == ref[p].topk(3).indices.tolist()


def test_tensor_parallel_ranks_cut_q_k_v_out_of_wqkv(pair):
    """Two ranks, each holding one key/value group's q, k and v rows of every wqkv."""
    with LLM(str(pair["sft"]), aligned=str(pair["aligned"]), tensor_parallel_size=2) as llm:
        outs = llm.generate(PROMPTS, [_params(a) for a in ALPHAS])
        _check(outs, llm.tokenizer, lambda a: reference_model(pair["llama-sft"], pair["llama-aligned"], a))
