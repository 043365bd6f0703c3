"""The α cache (engine/model_runner.py, AlphaCache): merged weights for the hot α values.

Exactness as everywhere (greedy tokens of HF transformers on the float32 reference merge), plus:
rows served from the cache are the merged checkpoint's rows bit for bit; tokens do not depend on
which path served them, on what shares the batch, or on the cache filling and evicting; the
cache never holds more than its budget, counted from the tensors it holds.
"""
from __future__ import annotations

import pytest
import torch
from reference import reference_greedy, reference_model

from expo_serve import LLM, SamplingParams
from expo_serve.delta.build import build_delta
from expo_serve.delta.merge import merge
from expo_serve.delta.sources import open_source
from expo_serve.delta.store import DeltaCheckpoint
from expo_serve.engine.model_runner import AlphaCache

ALPHAS = [-1.0, 0.0, 0.3, 2.5]
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of", "def add(a, b):\n    return",
           "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000"]
MAX_NEW = 10


@pytest.fixture
def always_merged(monkeypatch):
    """Every cached α group runs on its merged weights, whatever the cost rule would pick: the
    mechanism under test, for batches where the rule would choose the fused path."""
    from expo_serve.engine import model_runner

    monkeypatch.setattr(model_runner, "merged_is_cheaper", lambda rows, slots: True)


def _params(alpha, **kw):
    return SamplingParams(alpha=alpha, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, **kw)


def held_bytes(llm) -> int:
    """Bytes of every merged tensor the model holds for the cache."""
    return sum(t.numel() * t.element_size() for m in llm.engine.runner.model.modules() if hasattr(m, "merged")
               for pair in m.merged.values() for t in pair if t is not None)


def slot_bytes(llm) -> int:
    return llm.engine.runner.model.alpha_slot_bytes


def assert_reference_tokens(pair, llm, prompts, alphas, outs):
    for prompt, alpha, out in zip(prompts, alphas, outs):
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        expected, _ = reference_greedy(reference_model(*pair, alpha), ids, MAX_NEW)
        assert out.token_ids == expected, f"alpha={alpha}"


@pytest.mark.parametrize("name, options", [("llama", {}), ("llama-tied", {"arch": "llama", "tie": True}),
                                           ("mistral", {}), ("qwen2", {})])
def test_cached_alphas_match_the_reference_merge(pairs, name, options, always_merged):
    pair = pairs(name, **options)
    llm = LLM(str(pair[0]), aligned=str(pair[1]), alpha_cache_bytes=1 << 30)
    outs = llm.generate(PROMPTS, [_params(a) for a in ALPHAS])
    assert set(llm.engine.runner.alpha_cache.cached) == set(ALPHAS)  # every row ran on merged weights
    assert_reference_tokens(pair, llm, PROMPTS, ALPHAS, outs)


def test_cached_rows_equal_the_merged_checkpoint_bit_for_bit(pairs, tmp_path):
    sft, aligned = pairs("qwen2")  # biases too
    build_delta(open_source(sft), open_source(aligned), tmp_path / "d", dtype="float32")
    merge(open_source(sft), DeltaCheckpoint(tmp_path / "d"), 0.3, tmp_path / "merged")
    cached = LLM(str(sft), delta=str(tmp_path / "d"), alpha_cache_bytes=1 << 30)
    merged = LLM(str(tmp_path / "merged"))
    params = _params(0.3, logprobs=20, prompt_logprobs=20)
    a, b = cached.generate(PROMPTS[0], params)[0], merged.generate(PROMPTS[0], _params(None, logprobs=20, prompt_logprobs=20))[0]
    assert 0.3 in cached.engine.runner.alpha_cache.cached
    assert a.token_ids == b.token_ids
    for x, y in zip(a.prompt_logprobs[1:] + a.outputs[0].logprobs, b.prompt_logprobs[1:] + b.outputs[0].logprobs):
        assert x.logprob == y.logprob and x.top == y.top  # exact float equality, every top-20 entry


def test_tokens_do_not_depend_on_the_path_or_the_batch(pairs, always_merged):
    """Two slots for four α: two served merged, two fused, in one batch; then alone, each α on its
    own; then with the cache evicting and refilling. Every answer is the reference's."""
    pair = pairs("llama")
    probe = LLM(str(pair[0]), aligned=str(pair[1]), alpha_cache_bytes=0)
    two_slots = 2 * slot_bytes(probe)
    assert probe.engine.runner.alpha_cache is None
    llm = LLM(str(pair[0]), aligned=str(pair[1]), alpha_cache_bytes=two_slots)
    cache = llm.engine.runner.alpha_cache
    mixed = llm.generate(PROMPTS, [_params(a) for a in ALPHAS])
    assert len(cache.cached) == 2 and held_bytes(llm) <= two_slots
    assert_reference_tokens(pair, llm, PROMPTS, ALPHAS, mixed)
    cache.min_idle_steps = 0  # let the next batch evict
    for prompt, alpha, before in zip(reversed(PROMPTS), reversed(ALPHAS), reversed(mixed)):
        alone = llm.generate(PROMPTS[ALPHAS.index(alpha)], _params(alpha))[0]
        assert alone.token_ids == mixed[ALPHAS.index(alpha)].token_ids
        assert alpha in cache.cached and held_bytes(llm) <= two_slots
    assert cache.evictions >= 2
    fused_only = probe.generate(PROMPTS, [_params(a) for a in ALPHAS])
    assert [o.token_ids for o in fused_only] == [o.token_ids for o in mixed]


def test_the_cost_rule_picks_merged_weights_where_they_save_products():
    from expo_serve.engine.model_runner import merged_is_cheaper

    assert merged_is_cheaper({0.3: 16}, {0.3: 0})  # one α: one product instead of two
    assert merged_is_cheaper({0.3: 200, 1.0: 40}, {0.3: 0, 1.0: 1})  # prefill-sized groups
    assert not merged_is_cheaper({0.0: 6, 0.3: 5, 1.0: 5}, {0.0: 0, 0.3: 1, 1.0: 2})  # three decode groups
    assert not merged_is_cheaper({0.0: 8, 0.3: 8}, {0.0: 0})  # a small cached group beside fused rows


def test_cache_keeps_its_slots_under_more_live_alphas_than_slots():
    filled, dropped = [], []
    cache = AlphaCache(budget_bytes=250, slot_bytes=100, fill=lambda s, a: filled.append((s, a)),
                       drop=dropped.append, min_idle_steps=3)
    assert cache.capacity == 2
    sweep = [0.0, 0.1, 0.2, 0.3]
    for _ in range(10):  # every α live every step: the first two keep their slots, no thrash
        assert set(cache.plan(sweep)) == {0.0, 0.1}
    assert len(filled) == 2 and dropped == []
    for _ in range(3):  # 0.0 and 0.1 go idle; after min_idle_steps the LRU one makes room
        cache.plan([0.2])
    assert 0.2 in cache.cached and len(cache.cached) == 2 and len(dropped) == 1
    assert cache.bytes_held <= 250


def test_slots_are_filled_only_where_the_step_runs_merged():
    from expo_serve.engine.model_runner import worth_a_slot

    assert worth_a_slot({0.3: 16}, {}) == [0.3]  # a single-α decode step: merged halves its cost
    assert worth_a_slot({0.0: 6, 0.3: 5, 1.0: 5}, {}) == []  # three decode arms run fused: no memory for nothing
    assert worth_a_slot({0.3: 200}, {}) == [0.3]  # one α in the step: every layer runs merged
    assert worth_a_slot({0.3: 200, 1.0: 150}, {}) == []  # prefill groups: the torch path merges them on the fly
    assert worth_a_slot({0.3: 12, 1.0: 4}, {0.3: 0}) == []  # a small fused group beside a cached one


def test_mixed_arms_hold_no_merged_weights_and_one_alpha_fills_one_slot(pairs):
    pair = pairs("llama")
    llm = LLM(str(pair[0]), aligned=str(pair[1]), alpha_cache_bytes=1 << 30)
    cache = llm.engine.runner.alpha_cache
    mixed = llm.generate(PROMPTS[:3], [_params(a) for a in (0.0, 0.3, 2.5)])
    assert cache.cached == {} and held_bytes(llm) == 0  # every step mixed three α: all fused
    assert_reference_tokens(pair, llm, PROMPTS[:3], (0.0, 0.3, 2.5), mixed)
    alone = llm.generate(PROMPTS[1], _params(0.3))[0]
    assert list(cache.cached) == [0.3] and held_bytes(llm) == slot_bytes(llm)
    assert alone.token_ids == mixed[1].token_ids


def test_the_cpu_default_holds_one_alpha_and_serves_a_single_alpha_merged(pairs):
    pair = pairs("llama")
    llm = LLM(str(pair[0]), aligned=str(pair[1]))  # the engine's own default budget
    cache = llm.engine.runner.alpha_cache
    assert cache.capacity == 1
    out = llm.generate(PROMPTS[0], _params(0.3))[0]
    assert list(cache.cached) == [0.3] and held_bytes(llm) == slot_bytes(llm)
    assert_reference_tokens(pair, llm, PROMPTS[:1], [0.3], [out])


def test_a_new_single_alpha_takes_the_slot_at_once(pairs):
    """One slot, then traffic moves from one α to another (a sweep queued α by α, or a default α
    changed): the step of the new α evicts the idle one at once instead of running fused."""
    pair = pairs("llama")
    llm = LLM(str(pair[0]), aligned=str(pair[1]))
    cache = llm.engine.runner.alpha_cache
    assert cache.capacity == 1
    first = llm.generate(PROMPTS[0], _params(0.3))[0]
    second = llm.generate(PROMPTS[1], _params(2.5))[0]
    assert list(cache.cached) == [2.5] and cache.evictions == 1 and held_bytes(llm) == slot_bytes(llm)
    assert_reference_tokens(pair, llm, PROMPTS[:2], [0.3, 2.5], [first, second])
