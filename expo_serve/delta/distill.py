"""Scale distillation for sign-bit deltas (BitDelta's second step), `delta build --distill`.

After sign compression every bit tensor is Δ ≈ sign(Δ)·scale[row], with scale[row] initialised to
mean|Δ[row]| (the least-squares fit of the weights). Distillation refits the scales so that the
*model* with θ_sft + sign·scale behaves like the aligned model on calibration text; the signs never
change, only the scales (Adam on scale = scale₀·exp(u), u starting at 0: positive, and a learning
rate that does not depend on the size of |Δ|).

Objective: layer by layer, not end to end. The aligned model is run one decoder layer at a time over
the calibration batch; for each layer its scales are fitted so that the layer with θ_sft + decoded
Δ reproduces the aligned layer's output from the same inputs (the aligned model's inputs to that
layer), by mean squared error over the real (unpadded) tokens. An untied lm_head stored as bits is
fitted last the same way, on logits (final norm + lm_head, from the aligned last hidden states).
Why layer by layer: only one decoder layer's weights (θ_sft, θ_aligned, the signs) and the
calibration activations are ever in memory, so a 7B pair fits one GPU and the demo pair a small
CPU; end-to-end logit matching would hold and backpropagate through the whole model. The layers'
own errors do compound at inference, which a layer-local fit does not see: that is the price.
The embedding's scales are left as they are: an embedding's output is its row, so mean|Δ[row]| is
already the best fit of its output (and a tied embedding is also the lm_head, whose fit would
trade its input fidelity away).

The forward is transformers' own: the model class of the config, built on the meta device, with
each layer's weights passed in through `torch.func.functional_call`; the per-layer arguments
(masks, rotary embeddings) are recorded from one pass of the model itself over the calibration
batch, so sliding-window and full-attention layers each get their own mask.

Reported loss of a stage: Σ‖y_compact − y_aligned‖² / Σ‖y_sft − y_aligned‖² over the calibration
tokens, the share of the layer's alignment shift that the compression loses (1 = as if Δ were
dropped), before and after the fit; a fit that does not lower it is not kept.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from expo_kernels import from_parts

from ..errors import ExpoError
from .safetensors_io import SafetensorsReader, StreamingSafetensorsWriter
from .sources import ModelSource
from .store import MANIFEST, DeltaCheckpoint

DEFAULT_STEPS = 200
DEFAULT_LR = 1e-2
DEFAULT_BATCH = 4  # sequences a step
DEFAULT_MAX_LENGTH = 256  # tokens a sequence
DEFAULT_MAX_SEQUENCES = 128
_DEMO_DATA = Path(__file__).resolve().parent.parent / "demo" / "data"

OBJECTIVE = ("layer-wise: per decoder layer, MSE between its output with θ_sft + sign·scale and the aligned layer's "
             "output from the aligned model's inputs to it (lm_head, when untied and bit: MSE of logits); "
             "loss = Σ‖y_compact − y_aligned‖² / Σ‖y_sft − y_aligned‖²")


@dataclass
class DistillConfig:
    """How `delta build --distill` fits the bit scales."""

    calibration: str | os.PathLike | None = None  # .txt or .jsonl; None: the demo's own texts
    steps: int = DEFAULT_STEPS  # Adam steps per layer
    lr: float = DEFAULT_LR  # on u, where scale = scale₀·exp(u)
    batch_size: int = DEFAULT_BATCH
    max_length: int = DEFAULT_MAX_LENGTH
    max_sequences: int = DEFAULT_MAX_SEQUENCES
    seed: int = 0
    device: str | None = None  # default: cuda when available
    progress: Callable[[int, int, str], None] | None = field(default=None, repr=False)


@dataclass
class Calibration:
    sequences: list[list[int]]
    source: str

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


# -- calibration text -------------------------------------------------------------------------

def load_calibration(config: DistillConfig, aligned: ModelSource) -> Calibration:
    """Token sequences to distill on, or one ExpoError naming what is wrong with the file."""
    if config.steps <= 0:
        raise ExpoError(f"--distill-steps must be positive, got {config.steps}")
    try:
        tokenizer = aligned.load_tokenizer()
    except (OSError, ValueError) as exc:
        raise ExpoError(f"distillation needs the aligned model's tokenizer, and {aligned.spec} has none ({exc})") from exc
    if config.calibration is None:
        texts = [_chat(tokenizer, [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}], "the demo's")
                 for r in _jsonl_rows(_DEMO_DATA / "preferences.jsonl")]
        sequences = [tokenizer.encode(t, add_special_tokens=False)[: config.max_length] for t in texts]
        # (Not heldout_prompts.jsonl: those stay out of every fit, for the sweep to judge α on.)
        source = "demo: expo_serve/demo/data/preferences.jsonl (prompt + chosen), chat-formatted"
    else:
        path = Path(config.calibration)
        if not path.is_file():
            raise ExpoError(f"calibration file {path} does not exist")
        if path.suffix == ".txt":
            text = _read_text(path)
            ids = tokenizer.encode(text, add_special_tokens=True) if text.strip() else []
            sequences = [ids[i:i + config.max_length] for i in range(0, len(ids), config.max_length)]
        elif path.suffix == ".jsonl":
            rows = _jsonl_rows(path)
            texts = [_chat(tokenizer, _messages(row, path, n), str(path)) for n, row in enumerate(rows, start=1)]
            sequences = [tokenizer.encode(t, add_special_tokens=False)[: config.max_length] for t in texts]
        else:
            raise ExpoError(f"calibration file {path} must be a .txt of plain text or a .jsonl of {{\"prompt\"}} or {{\"messages\"}} lines")
        source = str(path)
    sequences = [s for s in sequences if len(s) >= 2][: config.max_sequences]
    if not sequences:
        raise ExpoError(f"calibration file {config.calibration} holds no text to distill on")
    return Calibration(sequences, source)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ExpoError(f"calibration file {path} is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ExpoError(f"cannot read calibration file {path}: {exc.strerror or exc}") from exc


def _jsonl_rows(path: Path) -> list:
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ExpoError(f"calibration file {path} line {n} is not valid JSON ({exc.msg})") from exc
    return rows


def _messages(row, path: Path, n: int) -> list[dict]:
    if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"] and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in row["messages"]):
        return row["messages"]
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"]:
        return [{"role": "user", "content": row["prompt"]}]
    raise ExpoError(f"calibration file {path} line {n} has neither a \"prompt\" string nor a \"messages\" list of {{role, content}}")


def _chat(tokenizer, messages: list[dict], where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ExpoError(f"{where} calibration lines are chat messages, but the aligned model's tokenizer has no chat template; give a .txt file")
    prompt_only = messages[-1]["role"] != "assistant"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt_only)


# -- the model, one stage at a time ------------------------------------------------------------

class _Captured(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer in one pass: records the arguments the model gives it."""

    def __init__(self, store: dict, index: int, last: bool, layer: nn.Module):
        super().__init__()
        self.store, self.index, self.last = store, index, last
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.store["input"] = hidden_states
        self.store[self.index] = (args, kwargs)
        if self.last:
            raise _Captured
        return hidden_states


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden_states):
        return self.lm_head(self.norm(hidden_states))


@dataclass
class _Chunk:
    mask: torch.Tensor  # [b, T] real tokens
    x: torch.Tensor  # the aligned model's input to the current stage
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _skeleton(config, device):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(inner, "embed_tokens"):
        raise ExpoError(f"distillation needs a decoder whose layers are model.model.layers; {type(model).__name__} is not one")
    for layer in layers:
        if any(True for _ in layer.buffers()):
            raise ExpoError(f"distillation cannot stream {type(layer).__name__}: its layers hold buffers")
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None:
        inner.rotary_emb = type(rotary)(config=model.config).to(device)
    return model


def _param_names(model: nn.Module, module: nn.Module) -> dict[str, str]:
    """{name within `module`: the model's canonical parameter name} (what the delta is keyed by)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    return {rel: canonical[id(p)] for rel, p in module.named_parameters()}


def _output(result):
    return result[0] if isinstance(result, (tuple, list)) else result


class _Stage:
    """One layer (or the head): its weights θ_sft, θ_aligned and the bit signs, and the fit."""

    def __init__(self, module, names, sft, aligned, delta: DeltaCheckpoint, device):
        self.module, self.names = module, names
        self.base, self.target, self.fixed, self.bits = {}, {}, {}, {}
        for rel, full in names.items():
            base = sft.get(full).to(device=device, dtype=torch.float32)
            self.base[rel] = base
            self.target[rel] = aligned.get(full).to(device=device, dtype=torch.float32)
            encoded = delta.load(full)
            if encoded.encoding == "bit":
                ones = torch.ones_like(encoded.scale)
                signs = from_parts("bit", encoded.shape, {"packed": encoded.packed, "scale": ones}).dequantize().to(device)
                self.bits[rel] = (signs, encoded.scale.to(device=device, dtype=torch.float32))
            else:
                self.fixed[rel] = base + encoded.dequantize(torch.float32).to(device)

    def weights(self, u: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        w = dict(self.fixed)
        for rel, (signs, scale) in self.bits.items():
            s = scale if u is None else scale * torch.exp(u[rel])
            w[rel] = self.base[rel] + signs * s.unsqueeze(-1)
        return w

    def run(self, weights, chunk: _Chunk) -> torch.Tensor:
        return _output(torch.func.functional_call(self.module, weights, (chunk.x, *chunk.args), chunk.kwargs))


def _sq(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (a[mask] - b[mask]).float().square().sum()


def _fit(stage: _Stage, chunks: list[_Chunk], config: DistillConfig, generator: torch.Generator):
    """Fit the stage's scales; return (aligned outputs per chunk, new scales or None, record)."""
    with torch.no_grad():
        targets = [stage.run(stage.target, c) for c in chunks]
        ref = sum(float(_sq(stage.run(stage.base, c), t, c.mask)) for c, t in zip(chunks, targets))
        before = sum(float(_sq(stage.run(stage.weights(None), c), t, c.mask)) for c, t in zip(chunks, targets))
    if ref == 0.0 or not stage.bits:
        return targets, None, None
    tokens = [int(c.mask.sum()) for c in chunks]
    total = sum(tokens)
    u = {rel: torch.zeros_like(scale, requires_grad=True) for rel, (_, scale) in stage.bits.items()}
    optimizer = torch.optim.Adam(u.values(), lr=config.lr)
    order: list[int] = []
    for _ in range(config.steps):
        if not order:
            order = torch.randperm(len(chunks), generator=generator).tolist()
        i = order.pop()
        optimizer.zero_grad(set_to_none=True)
        loss = _sq(stage.run(stage.weights(u), chunks[i]), targets[i], chunks[i].mask) / (ref * tokens[i] / total)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        fitted = stage.weights(u)
        after = sum(float(_sq(stage.run(fitted, c), t, c.mask)) for c, t in zip(chunks, targets))
        kept = after < before
        scales = {rel: (scale * torch.exp(u[rel])).detach() if kept else scale for rel, (_, scale) in stage.bits.items()}
    record = {"loss_before": before / ref, "loss_after": (after if kept else before) / ref, "kept": kept, "tensors": len(stage.bits)}
    return targets, scales, record


def _rel_error(stage: _Stage, rel: str, scale: torch.Tensor) -> float:
    signs, _ = stage.bits[rel]
    exact = (stage.target[rel] - stage.base[rel]).double()
    norm = float(exact.norm())
    return 0.0 if norm == 0.0 else float(((signs * scale.unsqueeze(-1)).double() - exact).norm()) / norm


def distill_scales(sft: ModelSource, aligned: ModelSource, folder: str | Path, config: DistillConfig,
                   calibration: Calibration) -> dict:
    """Refit the bit scales of the delta in `folder` (shards rewritten in place, manifest updated:
    `distillation` records the recipe and the losses) and return the new manifest."""
    started = time.time()
    folder = Path(folder)
    delta = DeltaCheckpoint(folder)
    if not any(e.encoding == "bit" for e in delta.entries.values()):
        raise ExpoError(f"the delta in {folder} has no sign-bit tensors whose scales distillation could fit")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(config.seed)
    model = _skeleton(sft.config, device)
    inner = model.model
    real_layers = list(inner.layers)
    stages = [(f"model.layers.{i}", layer, _param_names(model, layer)) for i, layer in enumerate(real_layers)]
    embed = inner.embed_tokens
    embed_names = _param_names(model, embed)
    if getattr(model, "lm_head", None) is not None and getattr(inner, "norm", None) is not None:
        head = _Head(inner.norm, model.lm_head)
        head_names = _param_names(model, head)
        head_weight = head_names.get("lm_head.weight")
        entry = delta.entries.get(head_weight)
        if head_weight not in embed_names.values() and entry is not None and entry.encoding == "bit":
            stages.append(("lm_head", head, head_names))
    progress = config.progress
    if progress:
        progress(0, len(stages), "calibration pass")

    # The aligned model's input to layer 0 and every layer's other arguments, one pass per chunk.
    embed.to_empty(device=device)
    with torch.no_grad():
        for rel, full in embed_names.items():
            embed.get_parameter(rel).copy_(aligned.get(full).to(torch.float32))
    store: dict = {}
    inner.layers = nn.ModuleList([_Recorder(store, i, i == len(real_layers) - 1, layer) for i, layer in enumerate(real_layers)])
    pad = 0
    chunks_per_layer: list[list[tuple]] = [[] for _ in real_layers]
    chunks: list[_Chunk] = []
    seqs = calibration.sequences
    for start in range(0, len(seqs), config.batch_size):
        batch = seqs[start:start + config.batch_size]
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=device)
        store.clear()
        with torch.no_grad():
            try:
                inner(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Captured:
                pass
        chunks.append(_Chunk(mask.bool(), store["input"]))
        for i in range(len(real_layers)):
            chunks_per_layer[i].append(store[i])
    store.clear()
    inner.layers = nn.ModuleList(real_layers)
    embed.to("meta")

    new_scales: dict[str, torch.Tensor] = {}
    rel_errors: dict[str, float] = {}
    records = []
    for s, (label, module, names) in enumerate(stages):
        if progress:
            progress(s, len(stages), label)
        if s < len(real_layers):
            for chunk, (args, kwargs) in zip(chunks, chunks_per_layer[s]):
                chunk.args, chunk.kwargs = args, kwargs
        else:
            for chunk in chunks:
                chunk.args, chunk.kwargs = (), {}
        stage = _Stage(module, names, sft, aligned, delta, device)
        targets, scales, record = _fit(stage, chunks, config, generator)
        if record is not None:
            records.append({"stage": label, **record})
            for rel, scale in scales.items():
                new_scales[names[rel]] = scale.cpu().contiguous()
                rel_errors[names[rel]] = _rel_error(stage, rel, scale)
        for chunk, t in zip(chunks, targets):  # the aligned output is the next layer's input
            chunk.x = t
        del stage, targets
    if progress:
        progress(len(stages), len(stages), "done")

    _rewrite_scales(folder, delta, new_scales)
    manifest = delta.manifest
    for name, error in rel_errors.items():
        manifest["tensors"][name]["rel_error"] = error
    before = [r["loss_before"] for r in records]
    after = [r["loss_after"] for r in records]
    manifest["distillation"] = {
        "objective": OBJECTIVE,
        "optimizer": "Adam",
        "parametrization": "scale = scale0 * exp(u), u fitted from 0 (signs fixed)",
        "steps": config.steps,
        "lr": config.lr,
        "batch_sequences": config.batch_size,
        "calibration": {"source": calibration.source, "sequences": len(calibration.sequences),
                        "tokens": calibration.tokens, "max_length": config.max_length},
        "loss_before": sum(before) / len(before) if before else None,
        "loss_after": sum(after) / len(after) if after else None,
        "stages": records,
        "device": str(device),
        "seconds": round(time.time() - started, 3),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def _rewrite_scales(folder: Path, delta: DeltaCheckpoint, scales: dict[str, torch.Tensor]) -> None:
    """Replace the `scale` part of each tensor in `scales`, shard by shard, same files and keys."""
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for name, scale in scales.items():
        where = delta.entries[name].parts["scale"]
        by_file.setdefault(where["file"], {})[where["key"]] = scale
    for file, replaced in by_file.items():
        path = folder / file
        reader = SafetensorsReader(path)
        tmp = path.with_name(path.name + ".distilled.tmp")
        writer = StreamingSafetensorsWriter(tmp, reader.metadata)
        try:
            for key in reader.keys():
                tensor = reader.get(key)
                if key in replaced:
                    new = replaced[key].to(tensor.dtype)
                    assert new.shape == tensor.shape, (key, new.shape, tensor.shape)
                    tensor = new
                writer.add(key, tensor)
            writer.close()
        except BaseException:
            writer.abort()
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
