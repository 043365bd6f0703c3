"""The engine's GPU code path end to end (Triton linear kernels and Triton paged decode attention),
run by Triton's interpreter in a process of its own, against the HF reference merge."""
import json
import os
import subprocess
import sys
import textwrap

from reference import reference_greedy, reference_model

ALPHAS = [-1.0, 0.3, 2.5]
PROMPTS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):"]

_RUN = textwrap.dedent("""
    import json, sys
    from expo_serve import LLM, SamplingParams
    llm = LLM(sys.argv[1], aligned=sys.argv[2], max_model_len=64)
    alphas, prompts = json.loads(sys.argv[3]), json.loads(sys.argv[4])
    outs = llm.generate(prompts, [SamplingParams(alpha=a, max_tokens=6, temperature=0.0, ignore_eos=True) for a in alphas])
    print(json.dumps([o.token_ids for o in outs]))
""")


def test_triton_path_matches_reference(pairs):
    sft, aligned = pairs("qwen2")  # qkv biases exercise delta_bias in the kernels
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _RUN, str(sft), str(aligned), json.dumps(ALPHAS), json.dumps(PROMPTS)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(aligned)
    for prompt, alpha, tokens in zip(PROMPTS, ALPHAS, got):
        expected, _ = reference_greedy(reference_model(sft, aligned, alpha), tok.encode(prompt, add_special_tokens=False), 6)
        assert tokens == expected, f"alpha={alpha}"
