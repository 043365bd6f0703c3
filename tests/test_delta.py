"""The delta toolkit against independent computations: transformers reads the models, torch
computes the reference formula, and the toolkit's output must match it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from factories import UNCHANGED, load_state, save_pair

from expo_serve.delta.build import build_delta
from expo_serve.delta.inspect import delta_report, format_report
from expo_serve.delta.merge import merge
from expo_serve.delta.sources import open_source
from expo_serve.delta.store import MANIFEST, DeltaCheckpoint
from expo_serve.errors import ExpoError

ALPHAS = [-1.0, 0.0, 0.3, 2.5]


def _build(pair, out, **kwargs):
    return build_delta(open_source(pair[0]), open_source(pair[1]), out, **kwargs)


@pytest.mark.parametrize("name,kwargs", [
    ("llama-tied", {"tie": True}),
    ("mistral", {"sliding_window": 8}),
    ("qwen2", {}),
])
def test_merge_equals_reference_formula_exactly(pairs, tmp_path, name, kwargs):
    pair = pairs(name, **kwargs)
    _build(pair, tmp_path / "delta", dtype="float32")
    sft, aligned = load_state(pair[0]), load_state(pair[1])
    for alpha in ALPHAS:
        out = merge(open_source(pair[0]), DeltaCheckpoint(tmp_path / "delta"), alpha, tmp_path / f"merged{alpha}")
        merged = load_state(out)
        assert merged.keys() == sft.keys()
        for key in sft:
            reference = sft[key] + (1.0 + alpha) * (aligned[key] - sft[key])
            assert torch.equal(merged[key], reference), f"{key} at alpha={alpha}"


def test_merged_checkpoint_is_a_complete_hf_model(pairs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pair = pairs("llama-tied", tie=True)
    _build(pair, tmp_path / "delta", dtype="float32")
    out = merge(open_source(pair[0]), DeltaCheckpoint(tmp_path / "delta"), 0.5, tmp_path / "m", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert (out / "generation_config.json").is_file()


def test_manifest_records_every_parameter_once(pairs, tmp_path):
    pair = pairs("llama-tied", tie=True)
    manifest = _build(pair, tmp_path / "d", encoding="int4", group_size=16)
    tensors = manifest["tensors"]
    assert "lm_head.weight" not in tensors and manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert tensors[UNCHANGED]["encoding"] == "zero" and tensors[UNCHANGED]["stored_bytes"] == 0
    for name, entry in tensors.items():
        if name == UNCHANGED:
            continue
        expected = "int4" if len(entry["shape"]) == 2 else "dense"
        assert entry["encoding"] == expected, name
    assert len(tensors) == len(load_state(pair[0]))
    assert manifest["sft"]["fingerprint"] and manifest["config"]["tie_word_embeddings"] is True
    assert (tmp_path / "d" / "aligned_meta" / "tokenizer.json").is_file()


# Stated bounds on ‖Δ − decoded‖/‖Δ‖ for the perturbation in factories.perturb (Gaussian Δ):
# int8 quantization noise is ~absmax/127/√12; int4 with small groups ~absmax/7/√12; sign bits
# keep √(2/π) of a Gaussian's norm (error √(1−2/π) ≈ 0.60); rank 8 of a 64-wide random matrix
# keeps part of it; dense fp32 is exact.
BOUNDS = {"dense": 0.0, "int8": 0.02, "int4": 0.2, "bit": 0.65, "lowrank": 0.95}


@pytest.mark.parametrize("encoding", list(BOUNDS))
def test_encoding_round_trip_error_within_bound(pairs, tmp_path, encoding):
    pair = pairs("qwen2")
    _build(pair, tmp_path / "d", encoding=encoding, rank=8, group_size=32, dtype="float32")
    delta = DeltaCheckpoint(tmp_path / "d")
    sft, aligned = load_state(pair[0]), load_state(pair[1])
    for name, encoded in delta:
        exact = aligned[name] - sft[name]
        error = (encoded.dequantize() - exact).norm() / exact.norm() if exact.norm() > 0 else encoded.dequantize().norm()
        assert error <= BOUNDS[encoding] + 1e-6 if exact.dim() == 2 else error <= 1e-6, (name, float(error))
        recorded = delta.manifest["tensors"][name]["rel_error"]
        assert recorded == pytest.approx(float(error), rel=1e-3, abs=1e-6)


def test_compact_merge_uses_decoded_delta(pairs, tmp_path):
    pair = pairs("mistral", sliding_window=8)
    _build(pair, tmp_path / "d", encoding="int8")
    delta = DeltaCheckpoint(tmp_path / "d")
    out = merge(open_source(pair[0]), delta, 0.3, tmp_path / "m")
    sft, merged = load_state(pair[0]), load_state(out)
    for name, encoded in delta:
        assert torch.equal(merged[name], sft[name] + encoded.dequantize() * 1.3), name


def test_sharded_pair_in_and_out(tmp_path):
    sft_dir, aligned_dir = save_pair(tmp_path / "pair", "llama", shard_size="40KB")
    assert (sft_dir / "model.safetensors.index.json").is_file()
    _build((sft_dir, aligned_dir), tmp_path / "d", dtype="float32", max_shard_bytes=30_000)
    assert len(list((tmp_path / "d").glob("delta-*.safetensors"))) > 1
    out = merge(open_source(sft_dir), DeltaCheckpoint(tmp_path / "d"), 1.0, tmp_path / "m", max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").is_file()
    sft, aligned, merged = load_state(sft_dir), load_state(aligned_dir), load_state(out)
    for key in sft:
        assert torch.equal(merged[key], sft[key] + 2.0 * (aligned[key] - sft[key]))


def test_inspect_reports_sizes_ratio_and_errors(pairs, tmp_path):
    pair = pairs("qwen2")
    _build(pair, tmp_path / "d", encoding="bit")
    report = delta_report(DeltaCheckpoint(tmp_path / "d"))
    numel = sum(t.numel() for t in load_state(pair[0]).values())
    assert report["dense_bf16_bytes"] == numel * 2
    assert report["compression_ratio"] == pytest.approx(report["dense_bf16_bytes"] / report["stored_bytes"])
    assert report["compression_ratio"] > 4  # sign bits: ~1/16 of bf16 for matrices; vectors stay dense
    assert 0.3 < report["overall_rel_error"] < 0.7
    text = format_report(report)
    assert "compression" in text and "model.layers.1.mlp.down_proj.weight" in text


# --- bad input: one clear error, nothing left behind ----------------------------------------------

def _assert_fails_cleanly(tmp_path, out, fn, match):
    with pytest.raises(ExpoError, match=match):
        fn()
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_mismatched_shapes_name_the_first_tensor(tmp_path):
    a = save_pair(tmp_path / "a", "llama", hidden=64)
    b = save_pair(tmp_path / "b", "llama", hidden=32)
    out = tmp_path / "d"
    _assert_fails_cleanly(tmp_path, out, lambda: _build((a[0], b[1]), out), r"model\.embed_tokens\.weight is \[320, 64\].*\[320, 32\]")


def test_another_architecture_is_refused(tmp_path):
    a = save_pair(tmp_path / "a", "llama")
    b = save_pair(tmp_path / "b", "qwen2")
    out = tmp_path / "d"
    _assert_fails_cleanly(tmp_path, out, lambda: _build((a[0], b[1]), out), "architecture")


def test_another_vocabulary_is_refused(pairs, tmp_path):
    from transformers import AutoTokenizer

    sft, aligned = pairs("qwen2")
    other = tmp_path / "aligned"
    shutil.copytree(aligned, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(t for t in vocab if len(t) > 1 and not t.startswith("<"))[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    assert AutoTokenizer.from_pretrained(other).get_vocab()[first] != AutoTokenizer.from_pretrained(sft).get_vocab()[first]
    out = tmp_path / "d"
    _assert_fails_cleanly(tmp_path, out, lambda: _build((sft, other), out), "vocabularies differ")


def test_missing_files_are_clear_errors(pairs, tmp_path):
    sft, aligned = pairs("llama")
    with pytest.raises(ExpoError, match="does not exist"):
        open_source(tmp_path / "nowhere" / "model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExpoError, match="no config.json"):
        open_source(empty)
    no_weights = tmp_path / "noweights"
    shutil.copytree(sft, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ExpoError, match="no .safetensors"):
        open_source(no_weights)
    sharded = save_pair(tmp_path / "sh", "llama", shard_size="40KB")[0]
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ExpoError, match="missing the shard"):
        open_source(sharded)
    with pytest.raises(ExpoError, match="no expo_delta.json"):
        DeltaCheckpoint(empty)


def test_truncated_safetensors_fails_and_leaves_nothing(pairs, tmp_path):
    sft, aligned = pairs("llama")
    broken = tmp_path / "broken"
    shutil.copytree(aligned, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "d"
    _assert_fails_cleanly(tmp_path, out, lambda: _build((sft, broken), out), "truncated")


def test_wrong_base_is_refused_and_leaves_nothing(pairs, tmp_path):
    pair = pairs("llama")
    other_sft, _ = save_pair(tmp_path / "other", "llama", seed=7)
    _build(pair, tmp_path / "d")
    out = tmp_path / "m"
    _assert_fails_cleanly(tmp_path, out, lambda: merge(open_source(other_sft), DeltaCheckpoint(tmp_path / "d"), 0.3, out),
                          "built on another base model")


def test_wrong_base_is_refused_before_the_merge_starts(pairs, tmp_path):
    pair = pairs("llama")
    other_sft, _ = save_pair(tmp_path / "other", "llama", seed=7)
    _build(pair, tmp_path / "d")
    merged = []
    with pytest.raises(ExpoError, match="built on another base model"):
        merge(open_source(other_sft), DeltaCheckpoint(tmp_path / "d"), 0.3, tmp_path / "m",
              progress=lambda i, n, name: merged.append(name))
    assert merged == [] and not any(p.name.startswith(".m") for p in tmp_path.iterdir())


def test_existing_output_is_refused_before_the_pair_is_checked(pairs, tmp_path):
    """A folder in the way is named first, even when the pair itself would be refused too."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExpoError, match="already exists"):
        _build((pairs("llama")[0], pairs("qwen2")[1]), out)
    assert (out / "keep.txt").read_text() == "mine"


def test_existing_output_is_refused(pairs, tmp_path):
    pair = pairs("llama")
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExpoError, match="already exists"):
        _build(pair, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_fingerprint_ignores_storage_dtype(pairs, tmp_path):
    from expo_serve.delta.store import fingerprint_source

    sft, _ = pairs("llama")
    merged_bf16 = tmp_path / "bf16"
    _build(pairs("llama"), tmp_path / "d", dtype="float32")
    merge(open_source(sft), DeltaCheckpoint(tmp_path / "d"), -1.0, merged_bf16, dtype="bfloat16")  # α=-1: θ_sft
    assert fingerprint_source(open_source(merged_bf16)) == fingerprint_source(open_source(sft))
    assert fingerprint_source(open_source(sft)) == DeltaCheckpoint(tmp_path / "d").sft_fingerprint


# --- the command line -----------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "expo_serve", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_build_inspect_merge(pairs, tmp_path):
    sft, aligned = pairs("qwen2")
    done = _cli("delta", "build", "--sft", sft, "--aligned", aligned, "--out", tmp_path / "d", "--format", "lowrank", "--rank", "4")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "d" / MANIFEST).is_file()
    shown = _cli("delta", "inspect", tmp_path / "d", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["encoding"] == "lowrank"
    merged = _cli("merge", "--sft", sft, "--delta", tmp_path / "d", "--alpha", "0.3", "--out", tmp_path / "m")
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_cli_errors_are_one_sentence_and_nonzero(pairs, tmp_path):
    sft, aligned = pairs("qwen2")
    failed = _cli("delta", "build", "--sft", tmp_path / "missing", "--aligned", aligned, "--out", tmp_path / "d")
    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0 and "does not exist" in failed.stderr
    assert "Traceback" not in failed.stderr
    bad_alpha = _cli("merge", "--sft", sft, "--delta", tmp_path, "--alpha", "nan", "--out", tmp_path / "m")
    assert bad_alpha.returncode == 2 and "not a finite number" in bad_alpha.stderr


def test_hub_id_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExpoError, match=r"hf download someorg/some-model --local-dir DIR"):
        open_source("someorg/some-model")
