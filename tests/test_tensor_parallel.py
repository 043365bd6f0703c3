"""Tensor parallelism (tensor_parallel_size=2, gloo on the CPU) serves what one rank serves.

Stated tolerance, as in test_engine_exactness.py: greedy tokens identical to Hugging Face
transformers on the float32 reference merge at each α (for a compact Δ, the merge of its decoded
Δ), and identical to the same engine with one rank, for one `generate` mixing α in
{-1, 0, 0.3, 2.5}. The pairs cover GQA with fewer key/value heads than ranks (replicated) and with
more (split), row-parallel biases (o_proj, down_proj) and column-split ones (Qwen2's qkv, Llama's
mlp_bias), a tied lm_head, a sliding window, and every encoding, `zero` included (each pair leaves
one parameter unchanged: a k_proj, an o_proj, a down_proj or a norm); the MLP width (136, 68 a rank)
puts the row-parallel shard of down_proj inside an int4 group and inside a byte of bit signs.
"""
from __future__ import annotations

import pytest
import torch
from factories import make_config, make_model, make_tokenizer, perturb
from reference import ALPHAS, PROMPTS, decoded_merge_model, reference_greedy

from expo_serve import LLM, SamplingParams
from expo_serve.delta.build import build_delta
from expo_serve.delta.sources import open_source
from expo_serve.errors import ExpoError
from expo_serve.model.parallel import held_bytes

MAX_NEW = 8

# name -> (arch, config changes, tied lm_head, the parameter left unchanged: its Δ is `zero`)
PAIRS = {
    "llama-kv1-bias": ("llama", {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}, False,
                       "model.layers.1.mlp.down_proj.weight"),
    "llama-kv4-tied": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 4}, True,
                       "model.layers.0.self_attn.k_proj.weight"),
    "mistral-window": ("mistral", {"sliding_window": 6}, False, "model.layers.0.post_attention_layernorm.weight"),
    "qwen2": ("qwen2", {}, False, "model.layers.1.self_attn.o_proj.weight"),
}
# Every architecture and every encoding at least once in the fast set. With -m slow, every pair
# also with each encoding whose row-parallel shard is not a plain slice (int4 groups, bit bytes,
# lowrank factors); dense and int8 shards are slices of their parts, like W's.
FAST = [("llama-kv1-bias", "int4"), ("llama-kv4-tied", "bit"), ("mistral-window", "lowrank"), ("qwen2", "int8"),
        ("qwen2", "dense")]
SLOW = [(pair, encoding) for pair in PAIRS for encoding in ("int4", "bit", "lowrank") if (pair, encoding) not in FAST]


@pytest.fixture(scope="module")
def tp_pair(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            arch, changes, tie, unchanged = PAIRS[name]
            config = make_config(arch, tie=tie)
            for key, value in changes.items():
                setattr(config, key, value)
            root = tmp_path_factory.mktemp(name)
            model = make_model(config, seed=3)
            tokenizer = make_tokenizer()
            for folder in ("sft", "aligned"):
                if folder == "aligned":
                    perturb(model, 4, unchanged=unchanged)
                model.save_pretrained(root / folder)
                tokenizer.save_pretrained(root / folder)
            made[name] = (root / "sft", root / "aligned")
        return made[name]

    return get


def _delta(tp_pair, tmp_path, name: str, encoding: str):
    sft, aligned = tp_pair(name)
    out = tmp_path / f"delta-{encoding}"
    build_delta(open_source(sft), open_source(aligned), out, encoding=encoding, rank=8, group_size=8, dtype="float32")
    return sft, out


def _generate(sft, delta, tensor_parallel_size: int):
    params = [SamplingParams(alpha=a, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True) for a in ALPHAS]
    with LLM(str(sft), delta=str(delta), tensor_parallel_size=tensor_parallel_size) as llm:
        return [out.token_ids for out in llm.generate(PROMPTS, params)], llm.tokenizer


def _check(tp_pair, tmp_path, name: str, encoding: str) -> None:
    sft, delta = _delta(tp_pair, tmp_path, name, encoding)
    two, tokenizer = _generate(sft, delta, 2)
    one, _ = _generate(sft, delta, 1)
    assert two == one, f"{name}/{encoding}: two ranks differ from one"
    for prompt, alpha, tokens in zip(PROMPTS, ALPHAS, two):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        expected, _ = reference_greedy(decoded_merge_model(sft, delta, alpha), ids, MAX_NEW)
        assert tokens == expected, f"{name}/{encoding} at alpha={alpha}: greedy tokens differ from the reference merge"


@pytest.mark.parametrize("name,encoding", FAST)
def test_two_ranks_equal_the_reference_merge_and_one_rank(tp_pair, tmp_path, name, encoding):
    _check(tp_pair, tmp_path, name, encoding)


@pytest.mark.slow
@pytest.mark.parametrize("name,encoding", SLOW)
def test_two_ranks_equal_the_reference_merge_and_one_rank_everywhere(tp_pair, tmp_path, name, encoding):
    _check(tp_pair, tmp_path, name, encoding)


def test_each_rank_holds_about_half_the_parameters(tp_pair, tmp_path):
    """Measured from the tensors each rank holds (θ_sft and Δ), against one rank's."""
    sft, delta = _delta(tp_pair, tmp_path, "qwen2", "dense")
    with LLM(str(sft), delta=str(delta)) as one:
        whole = held_bytes(one.engine.loaded.model)
    with LLM(str(sft), delta=str(delta), tensor_parallel_size=2) as two:
        per_rank = two.engine.workers.rank_bytes
        assert per_rank[0] == held_bytes(two.engine.loaded.model)
    assert len(per_rank) == 2
    assert all(b <= 0.55 * whole for b in per_rank), (per_rank, whole)


def test_a_model_that_cannot_be_split_is_refused_before_any_process_starts(tp_pair):
    sft, aligned = tp_pair("qwen2")  # 4 attention heads, 2 key/value heads
    with pytest.raises(ExpoError, match=r"^tensor_parallel_size 3 cannot split this model: its attention heads \(4\)"):
        LLM(str(sft), aligned=str(aligned), tensor_parallel_size=3)
    assert not torch.distributed.is_initialized()


def test_a_failed_start_stops_the_workers_and_leaves_no_process_group(tp_pair, tmp_path):
    import psutil

    sft, delta = _delta(tp_pair, tmp_path, "qwen2", "int8")
    (delta / "delta.safetensors").write_bytes(b"\x00" * 8)  # every rank fails to read it; the first to say so wins
    with pytest.raises(ExpoError, match="delta.safetensors"):
        LLM(str(sft), delta=str(delta), tensor_parallel_size=2)
    assert not torch.distributed.is_initialized()
    workers = [p for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert not workers


def test_chunked_prefill_preemption_alpha_cache_and_prompt_logprobs_run_as_on_one_rank(tp_pair, tmp_path):
    """The engine's machinery over two ranks: prompts prefilled in chunks of 5 tokens, a cache so
    small that sequences are preempted and recomputed, one α for every row (so the α cache fills a
    slot and its merged weights reach the worker), prompt logprobs gathered from both ranks."""
    sft, delta = _delta(tp_pair, tmp_path, "llama-kv1-bias", "dense")
    params = SamplingParams(alpha=0.3, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    with LLM(str(sft), delta=str(delta)) as one:
        expected = one.generate(PROMPTS, params)
    with LLM(str(sft), delta=str(delta), tensor_parallel_size=2, max_num_batched_tokens=5, block_size=4,
             num_kv_blocks=16) as two:
        got = two.generate(PROMPTS, params)
        assert two.engine.scheduler.num_preemptions > 0
        assert two.engine.runner.alpha_cache.fills > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for g, e in zip(got, expected):
        assert [lp.token_id for lp in g.prompt_logprobs[1:]] == [lp.token_id for lp in e.prompt_logprobs[1:]]
        for a, b in zip(g.prompt_logprobs[1:], e.prompt_logprobs[1:]):
            assert abs(a.logprob - b.logprob) < 2e-4
