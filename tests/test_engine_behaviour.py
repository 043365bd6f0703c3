"""Engine behaviour: batch invariance, aborts, limits, sampling options, the async interface."""
from __future__ import annotations

import asyncio

import pytest

from expo_serve import LLM, SamplingParams
from expo_serve.engine.async_engine import AsyncEngine
from expo_serve.engine.request import InvalidRequest

PROMPT = "The quick brown fox jumps over the lazy dog."
OTHERS = ["Hello world! How are you", "Paris is the capital of France.", "def add(a, b):", "Numbers: 0 1 2 3"]


@pytest.fixture(scope="module")
def llm(pairs):
    sft, aligned = pairs("qwen2")
    return LLM(str(sft), aligned=str(aligned), max_model_len=128)


def _greedy(alpha, n=12, **kw):
    return SamplingParams(alpha=alpha, max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_output_does_not_depend_on_batch_company(llm):
    alone = llm.generate([PROMPT], _greedy(0.3, logprobs=2))[0]
    crowd = llm.generate([OTHERS[0], PROMPT, *OTHERS[1:]], [_greedy(a, logprobs=2) for a in (-1.0, 0.3, 2.5, 0.0, 7.0)])
    assert crowd[1].token_ids == alone.token_ids
    for a, b in zip(crowd[1].outputs[0].logprobs, alone.outputs[0].logprobs):
        assert abs(a.logprob - b.logprob) < 1e-5


def test_seeded_sampling_is_batch_invariant_and_seed_dependent(llm):
    params = SamplingParams(alpha=0.5, max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT], params)[0]
    crowd = llm.generate([PROMPT, *OTHERS], [params] + [SamplingParams(alpha=a, max_tokens=16, seed=7) for a in (0, 1, 2, 3)])
    assert crowd[0].token_ids == alone.token_ids
    other_seed = llm.generate([PROMPT], SamplingParams(alpha=0.5, max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids


def test_top_k_one_is_greedy_and_alpha_changes_the_answer(llm):
    greedy = llm.generate([PROMPT], _greedy(0.0))[0]
    top1 = llm.generate([PROMPT], SamplingParams(alpha=0.0, max_tokens=12, temperature=0.8, top_k=1, seed=3, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids
    assert llm.generate([PROMPT], _greedy(2.5))[0].token_ids != greedy.token_ids


def test_stop_strings_are_cut_and_never_emitted(llm):
    full = llm.generate([PROMPT], _greedy(0.0, n=20))[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    stopped = llm.generate([PROMPT], _greedy(0.0, n=20, stop=[stop]))[0]
    assert stopped.text == text[: text.index(stop)]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop


def test_stop_token_ids_max_tokens_and_n(llm):
    full = llm.generate([PROMPT], _greedy(0.0, n=10))[0]
    token = full.token_ids[4]
    stopped = llm.generate([PROMPT], _greedy(0.0, n=10, stop_token_ids=[token]))[0]
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(token) + 1]
    assert stopped.outputs[0].stop_reason == token
    assert full.outputs[0].finish_reason == "length" and len(full.token_ids) == 10
    many = llm.generate([PROMPT], SamplingParams(alpha=0.3, max_tokens=8, n=3, seed=5, ignore_eos=True))[0]
    assert [o.index for o in many.outputs] == [0, 1, 2] and all(len(o.token_ids) == 8 for o in many.outputs)
    assert len({tuple(o.token_ids) for o in many.outputs}) > 1


def test_penalties_and_min_tokens_shape_the_choice(llm):
    plain = llm.generate([PROMPT], _greedy(0.0, n=24))[0]
    penalized = llm.generate([PROMPT], _greedy(0.0, n=24, frequency_penalty=2.0, presence_penalty=1.0))[0]
    assert penalized.token_ids != plain.token_ids
    assert len(set(penalized.token_ids)) >= len(set(plain.token_ids))
    repeat = llm.generate([PROMPT], _greedy(0.0, n=24, repetition_penalty=1.8))[0]
    assert repeat.token_ids != plain.token_ids
    first = plain.token_ids[0]
    held = llm.generate([PROMPT], SamplingParams(alpha=0.0, max_tokens=6, temperature=0.0, stop_token_ids=[first], min_tokens=3))[0]
    assert first not in held.token_ids[:3]


def test_logprobs_are_normalized_and_sorted(llm):
    import math

    out = llm.generate([PROMPT], _greedy(0.3, n=5, logprobs=4))[0]
    for lp, token in zip(out.outputs[0].logprobs, out.token_ids):
        assert lp.token_id == token and len(lp.top) == 4
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and lp.logprob == pytest.approx(values[0])
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5


def test_invalid_requests_are_clear_errors(llm):
    long_prompt = list(range(5, 5 + 129))
    with pytest.raises(InvalidRequest) as err:
        llm.generate([long_prompt], _greedy(0.0))
    assert err.value.code == "context_length_exceeded" and "context window is 128" in str(err.value)
    with pytest.raises(InvalidRequest) as err:
        llm.generate([PROMPT], SamplingParams(max_tokens=500))
    assert err.value.param == "max_tokens" and err.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest, match="alpha must be in"):
        llm.generate([PROMPT], SamplingParams(alpha=26.0))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        llm.generate([[1, 2, 99999]], _greedy(0.0))
    for bad in (float("nan"), float("inf"), "0.3", True):  # the engine judges α (AlphaRange.check)
        with pytest.raises(InvalidRequest) as err:
            llm.generate([PROMPT], SamplingParams(alpha=bad))
        assert err.value.param == "alpha"
    assert not llm.engine.has_unfinished() and llm.engine.requests == {}


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    free = engine.block_manager.num_free
    ids = [engine.add_request(p, _greedy(a, n=40)) for p, a in zip(OTHERS, (0.0, 0.3, 1.0, 2.0))]
    for _ in range(3):
        engine.step()
    held = engine.block_manager.num_free
    assert held < free
    final = engine.abort_request(ids[1])
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free > held and ids[1] not in engine.requests
    done = engine.run_to_completion([ids[0], ids[2], ids[3]])
    assert all(len(o.token_ids) == 40 for o in done.values())
    assert engine.block_manager.num_free == free and not engine.has_unfinished()


def test_async_engine_streams_aborts_and_reports_errors(pairs):
    sft, aligned = pairs("qwen2")
    llm = LLM(str(sft), aligned=str(aligned), max_model_len=128)
    engine = AsyncEngine(llm.engine)

    async def collect(prompt, params):
        outs = [o async for o in engine.generate(prompt, params)]
        return outs

    async def scenario():
        streamed = await collect(PROMPT, _greedy(0.3, n=8))
        assert [len(o.token_ids) for o in streamed] == list(range(1, 9)) and streamed[-1].finished
        with pytest.raises(InvalidRequest):
            await collect(PROMPT, SamplingParams(alpha=100.0))
        # A consumer that walks away aborts its request; blocks come back within a step.
        free = llm.engine.block_manager.num_free
        stream = engine.generate(PROMPT, _greedy(0.0, n=80))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(50):
            await asyncio.sleep(0.05)
            if engine.stats().num_running == 0:
                break
        assert engine.stats().num_running == 0 and llm.engine.block_manager.num_free == free
        return streamed[-1]

    last = asyncio.run(scenario())
    sync = llm.generate([PROMPT], _greedy(0.3, n=8))[0]
    assert last.token_ids == sync.token_ids and last.text == sync.text
    engine.shutdown()
