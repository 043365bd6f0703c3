"""The real demo pair (SmolLM2-135M SFT + local DPO): one batch mixing α equals the HF
reference merge at each α. Slow: it prepares the pair on first use (minutes, then cached)."""
import pytest
from reference import reference_greedy, reference_model

from expo_serve import LLM, SamplingParams

pytestmark = pytest.mark.slow

ALPHAS = [-1.0, 0.0, 0.3, 2.5]
MAX_NEW = 24
LOGPROB_TOL = 5e-4  # float32, 30 layers: a little looser than for the two-layer pairs


@pytest.fixture(scope="module")
def demo():
    from expo_serve.demo.pair import prepare_demo_pair
    from expo_serve.demo.run import demo_delta

    pair = prepare_demo_pair()
    return pair, demo_delta(pair)


def test_demo_pair_batch_matches_reference_merge(demo):
    pair, delta = demo
    llm = LLM(str(pair.sft_dir), delta=str(delta))
    conversations = [[{"role": "user", "content": p}] for p in pair.prompts[: len(ALPHAS)]]
    params = [SamplingParams(alpha=a, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=3) for a in ALPHAS]
    outs = llm.chat(conversations, params)
    for conversation, alpha, out in zip(conversations, ALPHAS, outs):
        ids = llm.apply_chat_template(conversation)
        expected, log_probs = reference_greedy(reference_model(pair.sft_dir, pair.aligned_dir, alpha), ids, MAX_NEW)
        assert out.token_ids == expected, f"alpha={alpha}"
        for step, lp in enumerate(out.outputs[0].logprobs):
            assert abs(lp.logprob - float(log_probs[step, lp.token_id])) < LOGPROB_TOL


def test_alpha_changes_demo_answers(demo):
    pair, delta = demo
    llm = LLM(str(pair.sft_dir), delta=str(delta))
    conversation = [{"role": "user", "content": pair.prompts[0]}]
    outs = llm.chat([conversation] * 3, [SamplingParams(alpha=a, max_tokens=48, temperature=0.0) for a in (-1.0, 0.0, 1.0)])
    assert len({o.text for o in outs}) == 3, [o.text for o in outs]
