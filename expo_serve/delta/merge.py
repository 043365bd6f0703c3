"""`expo-serve merge`: θ(α) = θ_sft + (1+α)·Δ materialized as a Hugging Face checkpoint.

Computed in float32 one parameter at a time, then cast to the requested dtype. Config,
generation config, tokenizer and chat template come from the aligned model (kept in the delta's
`aligned_meta/`), as the ExPO reference script takes them from the aligned checkpoint. Tensors are
written in the base checkpoint's own layout: an InternLM2 pair merges into an InternLM2 checkpoint,
with the remote-code files of the aligned folder beside it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from expo_kernels import EncodedDelta

from ..atomic_dir import atomic_output_dir, check_output_dir
from ..errors import ExpoError
from .build import DEFAULT_MAX_SHARD_BYTES, DTYPES, Progress
from .safetensors_io import ShardedWriter
from .sources import ModelSource
from .store import DeltaCheckpoint, fingerprint_source

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def expo_merge_tensor(base: torch.Tensor, delta: EncodedDelta, alpha: float) -> torch.Tensor:
    """θ_sft + (1+α)·Δ in float32: the reference formula, written once for every caller."""
    return base.to(torch.float32) + delta.dequantize(torch.float32) * (1.0 + alpha)


def merge(
    sft: ModelSource,
    delta: DeltaCheckpoint,
    alpha: float,
    out: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress | None = None,
) -> Path:
    if dtype is not None and dtype not in DTYPES:
        raise ExpoError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_output_dir(out)
    delta.check_layout(sft)
    # A delta built on another base is refused before anything is written: one read of the base
    # first (the merge reads it again, mostly from the page cache).
    delta.check_base(fingerprint_source(sft), sft.spec)
    names = sft.parameter_names
    native = sft.native_writer()  # back to the checkpoint's own layout (InternLM2's packed wqkv)
    out_dtype = None
    with atomic_output_dir(out) as folder:
        writer = ShardedWriter(folder, "model", max_shard_bytes)
        try:
            for i, name in enumerate(names):
                if progress:
                    progress(i, len(names), name)
                base = sft.get(name)
                target = DTYPES[dtype] if dtype else base.dtype
                out_dtype = out_dtype or target
                for stored_name, tensor in native.add(name, expo_merge_tensor(base, delta.load(name), alpha).to(target)):
                    writer.add(stored_name, tensor)
            native.close()
            weight_map = writer.close()
        except BaseException:
            writer.abort()
            raise
        if len(set(weight_map.values())) > 1:
            total = sum(f.stat().st_size for f in folder.glob("model-*.safetensors"))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_metadata(delta, folder, out_dtype)
    if progress:
        progress(len(names), len(names), "done")
    return Path(out)


def _write_metadata(delta: DeltaCheckpoint, folder: Path, dtype: torch.dtype) -> None:
    meta = delta.aligned_meta
    if not (meta / "config.json").is_file():
        raise ExpoError(f"{delta.folder} is incomplete: {meta.name}/config.json is missing")
    for path in meta.iterdir():
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    config = json.loads((folder / "config.json").read_text())
    name = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if "torch_dtype" in config and "auto_map" in config:
        config["torch_dtype"] = name  # remote code written for transformers 4 reads this key
    else:
        config.pop("torch_dtype", None)
    config["dtype"] = name
    (folder / "config.json").write_text(json.dumps(config, indent=2))
