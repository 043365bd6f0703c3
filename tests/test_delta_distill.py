"""Scale distillation (`delta build --format bit --distill`): the scales move, the signs never do,
the calibration loss falls, the manifest says how, and the delta serves its own decoded merge."""
from __future__ import annotations

import json

import pytest
import torch
from factories import CORPUS
from reference import PROMPTS, decoded_merge_model, reference_greedy

from expo_serve import LLM, SamplingParams
from expo_serve.delta.build import build_delta
from expo_serve.delta.distill import DistillConfig
from expo_serve.delta.inspect import delta_report, format_report
from expo_serve.delta.sources import open_source
from expo_serve.delta.store import DeltaCheckpoint
from expo_serve.errors import ExpoError

STEPS = 60
MAX_NEW = 8


def _build(pair, out, **kwargs):
    return build_delta(open_source(pair[0]), open_source(pair[1]), out, encoding="bit", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def built(pairs, tmp_path_factory):
    """The qwen2 pair (untied, with biases) as plain bit and as distilled bit (default calibration)."""
    pair = pairs("qwen2")
    root = tmp_path_factory.mktemp("distill")
    _build(pair, root / "plain")
    manifest = _build(pair, root / "distilled", distill=DistillConfig(steps=STEPS, max_sequences=24, max_length=96))
    return pair, root / "plain", root / "distilled", manifest


def test_distillation_lowers_the_loss_and_never_changes_the_signs(built):
    pair, plain_dir, distilled_dir, manifest = built
    stages = manifest["distillation"]["stages"]
    assert [s["stage"] for s in stages] == ["model.layers.0", "model.layers.1", "lm_head"]
    for s in stages:
        assert s["kept"] and s["loss_after"] < s["loss_before"], s
    d = manifest["distillation"]
    assert d["loss_after"] < 0.97 * d["loss_before"]
    plain, distilled = DeltaCheckpoint(plain_dir), DeltaCheckpoint(distilled_dir)
    moved = 0
    for name, before in plain:
        after = distilled.load(name)
        assert after.encoding == before.encoding
        if before.encoding != "bit":  # dense 1-D tensors and zero tensors are untouched
            assert all(torch.equal(after.parts()[p], t) for p, t in before.parts().items()), name
            continue
        assert torch.equal(after.packed, before.packed), name  # the signs
        assert bool((after.scale >= 0).all())
        moved += not torch.equal(after.scale, before.scale)
        if name == "model.embed_tokens.weight":  # not fitted: mean|Δ[row]| is already its output's best fit
            assert torch.equal(after.scale, before.scale)
    assert moved == 2 * 7 + 1  # every bit matrix of both layers and the lm_head


def test_manifest_records_the_recipe_and_inspect_shows_it(built):
    pair, _, distilled_dir, manifest = built
    d = manifest["distillation"]
    assert d["steps"] == STEPS and d["lr"] > 0 and d["optimizer"] == "Adam"
    assert d["calibration"]["source"].startswith("demo:") and d["calibration"]["tokens"] > 1000
    assert "aligned layer's output" in d["objective"]
    on_disk = DeltaCheckpoint(distilled_dir).manifest
    assert on_disk["distillation"] == json.loads(json.dumps(d))
    # The recorded error is that of the stored (distilled) scales.
    from factories import load_state

    sft, aligned = load_state(pair[0]), load_state(pair[1])
    name = "model.layers.1.mlp.down_proj.weight"
    exact = aligned[name] - sft[name]
    decoded = DeltaCheckpoint(distilled_dir).load(name).dequantize()
    assert on_disk["tensors"][name]["rel_error"] == pytest.approx(float((decoded - exact).norm() / exact.norm()), rel=1e-4)
    report = delta_report(DeltaCheckpoint(distilled_dir))
    assert report["distillation"]["loss_after"] == d["loss_after"]
    text = format_report(report)
    assert "distilled   Adam, 60 steps a layer" in text and "model.layers.1" in text and "calibration: demo" in text
    assert "distilled" not in format_report(delta_report(DeltaCheckpoint(built[1])))


def test_distilled_delta_serves_its_decoded_merge(built):
    pair, _, distilled_dir, _ = built
    llm = LLM(str(pair[0]), delta=str(distilled_dir))
    alphas = (0.0, 2.5)
    params = [SamplingParams(alpha=a, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True) for a in alphas]
    outs = llm.generate(PROMPTS[:2], params)
    for prompt, alpha, out in zip(PROMPTS[:2], alphas, outs):
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        ref_tokens, _ = reference_greedy(decoded_merge_model(pair[0], distilled_dir, alpha), ids, MAX_NEW)
        assert out.token_ids == ref_tokens, f"alpha={alpha}"


def test_txt_and_jsonl_calibration(pairs, tmp_path):
    pair = pairs("llama")
    txt = tmp_path / "cal.txt"
    txt.write_text("\n\n".join(CORPUS * 3))
    manifest = _build(pair, tmp_path / "t", distill=DistillConfig(calibration=txt, steps=5, max_length=32))
    cal = manifest["distillation"]["calibration"]
    assert cal["source"] == str(txt) and cal["sequences"] > 1 and cal["tokens"] > 32
    jsonl = tmp_path / "cal.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"prompt": CORPUS[0]}),
        "",
        json.dumps({"messages": [{"role": "user", "content": CORPUS[1]}, {"role": "assistant", "content": CORPUS[2]}]}),
    ]))
    manifest = _build(pair, tmp_path / "j", distill=DistillConfig(calibration=jsonl, steps=5))
    assert manifest["distillation"]["calibration"]["sequences"] == 2


@pytest.mark.parametrize("name,content,match", [
    ("missing.txt", None, "does not exist"),
    ("cal.csv", "a,b\n", "must be a .txt of plain text or a .jsonl"),
    ("cal.jsonl", '{"prompt": "hi"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ("cal.jsonl", '{"text": "hi"}\n', "line 1 has neither a \"prompt\" string nor a \"messages\" list"),
    ("cal.txt", "  \n", "holds no text"),
])
def test_bad_calibration_is_one_clear_error_before_any_work(pairs, tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    out = tmp_path / "d"
    with pytest.raises(ExpoError, match=match) as caught:
        _build(pairs("llama"), out, distill=DistillConfig(calibration=path))
    assert "\n" not in str(caught.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".d.partial")]


def test_distill_needs_bit_format(pairs, tmp_path):
    pair = pairs("llama")
    with pytest.raises(ExpoError, match="use it with --format bit"):
        build_delta(open_source(pair[0]), open_source(pair[1]), tmp_path / "d", encoding="int8", distill=DistillConfig())
    assert not (tmp_path / "d").exists()


def test_cli_distill_build_inspect_and_errors(pairs, tmp_path, capsys):
    """In process (the subprocess path of the command line is tested in test_delta.py)."""
    from expo_serve.cli import main

    sft, aligned = pairs("llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    build = ["delta", "build", "--sft", str(sft), "--aligned", str(aligned), "--format", "bit"]
    capsys.readouterr()
    assert main([*build, "--out", str(tmp_path / "x"), "--distill", "--calibration", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("expo-serve: error: ") and err.strip().count("\n") == 0 and "line 1 is not valid JSON" in err
    assert not (tmp_path / "x").exists()
    assert main([*build, "--out", str(tmp_path / "y"), "--calibration", str(bad)]) == 1
    assert "only apply with --distill" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_text(" ".join(CORPUS))
    assert main([*build, "--out", str(tmp_path / "d"), "--distill", "--distill-steps", "3", "--calibration", str(small)]) == 0
    assert "distilled scales: loss" in capsys.readouterr().out
    assert main(["delta", "inspect", str(tmp_path / "d")]) == 0
    assert "distilled   Adam, 3 steps a layer" in capsys.readouterr().out
