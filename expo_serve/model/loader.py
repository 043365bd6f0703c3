"""Load θ_sft and Δ into the ExPO model: both through the same per-module loaders.

Δ comes from a delta folder (checked against the base's fingerprint), from an aligned
checkpoint (Δ = θ_aligned − θ_sft computed here in float32, on the target device, and kept dense
unless another encoding is asked for), or from nowhere
(a plain model: every Δ is zero, α changes nothing; this is how a merged checkpoint is served).
Tokenizer, chat template and generation defaults come from the aligned model when there is one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from expo_kernels import DEFAULT_GROUP_SIZE, DEFAULT_RANK, EncodedDelta, encode_delta

from ..delta.build import verify_pair
from ..delta.sources import FolderSource, ModelSource, open_source
from ..delta.store import DeltaCheckpoint, Fingerprint
from ..delta.tokenizer import load_tokenizer
from ..errors import ExpoError
from .llama import SUPPORTED_ARCHITECTURES, ExpoForCausalLM, context_window

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: ExpoForCausalLM
    config: object
    tokenizer: object
    eos_token_ids: list[int]
    dtype: torch.dtype
    device: torch.device


def load_model(
    sft: str | ModelSource,
    *,
    delta: str | None = None,
    aligned: str | ModelSource | None = None,
    aligned_encoding: str = "dense",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    max_positions: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    tp=None,
    checks: bool = True,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """`sft` and `aligned` are anything open_source takes (a ModelSource too). With `aligned`,
    Δ is encoded as `aligned_encoding` (default group size and rank) once computed.

    With `tp` (model/parallel.TensorParallel) only this rank's slices of θ_sft and Δ are read and
    held. `checks=False` (a tensor-parallel worker, whose rank 0 has checked the pair and the
    delta's base) skips those checks and the tokenizer. `trust_remote_code` lets a tokenizer
    shipped as code without a fast tokenizer file run that code (delta/tokenizer.py)."""
    if delta and aligned:
        raise ExpoError("give either a delta folder or an aligned model, not both")
    if tp is not None and aligned and aligned_encoding != "dense":
        raise ExpoError("with tensor parallelism a Δ computed from the aligned model is kept dense; build a delta "
                        f"folder (expo-serve delta build --format {aligned_encoding}) to serve it {aligned_encoding}")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device)
    base = open_source(sft, trust_remote_code=trust_remote_code)
    if base.architecture not in SUPPORTED_ARCHITECTURES:
        raise ExpoError(f"{base.spec} is a {base.architecture}; expo-serve runs {', '.join(SUPPORTED_ARCHITECTURES)}")
    checkpoint = aligned_source = None
    tokenizer, eos = None, []
    if delta:
        checkpoint = DeltaCheckpoint(delta)
        checkpoint.check_layout(base)
        if checks:
            tokenizer, eos = _tokenizer_and_eos(checkpoint.aligned_meta, trust_remote_code)
    elif aligned:
        aligned_source = open_source(aligned, trust_remote_code=trust_remote_code)
        if checks:
            verify_pair(base, aligned_source)
            tokenizer, eos = _tokenizer_and_eos_from_source(aligned_source)
    elif checks:
        tokenizer, eos = _tokenizer_and_eos_from_source(base)

    config = base.config
    if tp is not None:
        tp.check(config, tp.size)
    positions = max_positions or context_window(config)
    names = base.parameter_names
    model = ExpoForCausalLM(config, names, "lm_head.weight" in base.tied, positions, dtype, device, tp)
    fingerprint = Fingerprint()
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), name)
        split = None if tp is None else tp.split(name, config)
        tensor = base.get(name) if split is None else base.get_slice(name, *split)
        if checkpoint is not None and checks:
            _fingerprint(fingerprint, base, name, tensor if split is None else None)
        module, shard, kind = model.module_for(name)
        module.load_base(shard, kind, tensor.to(device=device, dtype=dtype))
        if checkpoint is not None:
            encoded = checkpoint.load(name) if split is None else checkpoint.load_shard(name, *split)
            module.load_delta(shard, kind, _on_device(encoded, device, dtype))
        elif aligned_source is not None:
            other = aligned_source.get(name) if split is None else aligned_source.get_slice(name, *split)
            exact = other.to(device, torch.float32) - tensor.to(device, torch.float32)
            chosen = aligned_encoding if torch.any(exact) else "zero"
            encoded: EncodedDelta = encode_delta(exact, chosen, group_size=DEFAULT_GROUP_SIZE, rank=DEFAULT_RANK)
            module.load_delta(shard, kind, _on_device(encoded, device, dtype))
    if checkpoint is not None and checks:
        checkpoint.check_base(fingerprint.hexdigest(), base.spec)
    for module in model.modules():
        if hasattr(module, "finalize"):
            module.finalize()
    if progress:
        progress(len(names), len(names), "done")
    model.eval()
    return LoadedModel(model, config, tokenizer, eos, dtype, device)


def _fingerprint(fingerprint: Fingerprint, base: ModelSource, name: str, tensor: torch.Tensor | None) -> None:
    """Add a parameter to the base's fingerprint: from the tensor when it was read whole, else
    from its sampled values alone (a tensor-parallel rank reads no whole tensor)."""
    if tensor is not None:
        fingerprint.add(name, tensor)
        return
    shape = tuple(base.shape(name))
    index = Fingerprint.sample_index(math.prod(shape))
    values = base.sample(name, index) if index is not None else base.get(name).reshape(-1)
    fingerprint.add_sample(name, shape, values)


def _on_device(delta: EncodedDelta, device: torch.device, dtype: torch.dtype) -> EncodedDelta:
    """Move Δ to the device. Matrices take the model's dtype; 1-D Δ (norms, biases) stay float32,
    since they are applied as exact per-row parameters."""
    if delta.encoding == "zero":
        return delta
    if len(delta.shape) == 1:
        return delta.to(device, torch.float32)
    return delta.to(device, dtype)


def _eos_ids(generation_config: dict, tokenizer) -> list[int]:
    ids = generation_config.get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]


def _tokenizer_and_eos(folder: Path, trust_remote_code: bool):
    try:
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ExpoError(f"cannot load the tokenizer from {folder}: {exc}") from exc
    gen_path = Path(folder) / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return tokenizer, _eos_ids(generation, tokenizer)


def _tokenizer_and_eos_from_source(source: ModelSource):
    if isinstance(source, FolderSource):
        return _tokenizer_and_eos(source.folder, source.trust_remote_code)
    tokenizer = source.load_tokenizer()
    return tokenizer, _eos_ids(source.generation_config_dict(), tokenizer)
