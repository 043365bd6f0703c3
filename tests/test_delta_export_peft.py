"""`expo-serve delta export --peft`: the adapter loads with peft into the HF model and, at a LoRA
scale of 1+α, reproduces the engine on the part of Δ it carries (the linear layers and embedding).

Tolerance: log-probabilities within 2e-4 of the engine's, as in test_engine_exactness.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from reference import PROMPTS

from expo_serve import LLM, SamplingParams
from expo_serve.cli import main
from expo_serve.delta.build import build_delta
from expo_serve.delta.export_peft import export_peft
from expo_serve.delta.sources import open_source
from expo_serve.delta.store import MANIFEST
from expo_serve.errors import ExpoError

LOGPROB_TOL = 2e-4


def _linear_only(folder, out):
    """The delta without the tensors an adapter cannot carry (norms and biases): what the export keeps."""
    shutil.copytree(folder, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for entry in manifest["tensors"].values():
        if len(entry["shape"]) == 1:
            entry.update(encoding="zero", parts={}, params={})
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def _peft_log_probs(sft, adapter, ids, alpha):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32), adapter).eval()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scaling["default"] = 1.0 + alpha  # llama.cpp's per-request `scale`
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("name,tie,encoding", [("llama", False, "lowrank"), ("llama-tied", True, "lowrank"),
                                               ("llama", False, "mixed")])
def test_adapter_at_scale_one_plus_alpha_reproduces_the_engine(pairs, tmp_path, name, tie, encoding):
    sft, aligned = pairs(name, arch="llama", tie=tie)
    build_delta(open_source(sft), open_source(aligned), tmp_path / "d", encoding=encoding, rank=8, bits=2.0,
                dtype="float32")
    result = export_peft(tmp_path / "d", tmp_path / "adapter")
    assert result["rank"] == 8 or encoding == "mixed"  # mixed: the ranks its bands fit in 2 bits a parameter
    assert all("norm" in n or n.endswith(".bias") for n in result["left_out"])  # only what PEFT cannot scale
    llm = LLM(str(sft), delta=str(_linear_only(tmp_path / "d", tmp_path / "linear")))
    ids = llm.tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    for alpha in (0.0, 0.3, 2.5):
        out = llm.generate([ids], SamplingParams(alpha=alpha, max_tokens=0, prompt_logprobs=3))[0]
        reference = _peft_log_probs(sft, tmp_path / "adapter", ids, alpha)
        for p, lp in enumerate(out.prompt_logprobs[1:]):
            assert abs(lp.logprob - float(reference[p, ids[p + 1]])) < LOGPROB_TOL, (alpha, p)
            assert [t for t, _ in lp.top] == reference[p].topk(3).indices.tolist()


def test_cli_warns_about_what_the_adapter_leaves_out(pairs, tmp_path, capsys):
    sft, aligned = pairs("llama")
    build_delta(open_source(sft), open_source(aligned), tmp_path / "d", encoding="lowrank", rank=4)
    assert main(["delta", "export", str(tmp_path / "d"), "--peft", str(tmp_path / "adapter")]) == 0
    captured = capsys.readouterr()
    assert "a PEFT LoRA adapter over" in captured.out
    assert "not in the adapter" in captured.err and "input_layernorm.weight" in captured.err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["peft_type"] == "LORA"


def test_a_delta_that_is_not_low_rank_is_refused_in_one_sentence(pairs, tmp_path):
    sft, aligned = pairs("llama")
    build_delta(open_source(sft), open_source(aligned), tmp_path / "d", encoding="int8")
    with pytest.raises(ExpoError, match="no low-rank tensor to export; build it with --format lowrank or mixed"):
        export_peft(tmp_path / "d", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
