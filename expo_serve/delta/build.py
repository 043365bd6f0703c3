"""`expo-serve delta build`: Δ = θ_aligned − θ_sft for every parameter, encoded and stored.

Streaming: one parameter at a time is read from each model, subtracted in float32, encoded and
written, so peak memory is a few tensors, not two models.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from expo_kernels import DEFAULT_BITS, DEFAULT_GROUP_SIZE, DEFAULT_RANK, ENCODINGS, encode_delta

from .. import __version__
from ..atomic_dir import atomic_output_dir, check_output_dir
from ..errors import ExpoError
from .safetensors_io import ShardedWriter
from .distill import DistillConfig, distill_scales, load_calibration
from .sources import ModelSource
from .store import ALIGNED_META, FORMAT, FORMAT_VERSION, MANIFEST, Fingerprint

DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Config fields that are bookkeeping, not architecture: the pair may differ in them.
_CONFIG_FIELDS_FREE = {
    "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "_commit_hash", "quantization_config", "bos_token_id", "eos_token_id", "pad_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "max_position_embeddings",
}

Progress = Callable[[int, int, str], None]


def verify_pair(sft: ModelSource, aligned: ModelSource) -> None:
    """Same architecture, parameters and shapes, config and vocabulary, or one error naming the first difference."""
    if sft.architecture != aligned.architecture:
        raise ExpoError(f"the pair differs in architecture: {sft.spec} is {sft.architecture}, {aligned.spec} is {aligned.architecture}")
    sft.check_complete()
    aligned.check_complete()
    for name in sft.parameter_names:
        if name not in aligned.parameter_names:
            raise ExpoError(f"{aligned.spec} has no tensor {name}")
        if sft.shape(name) != aligned.shape(name):
            raise ExpoError(f"tensor {name} is {list(sft.shape(name))} in {sft.spec} but {list(aligned.shape(name))} in {aligned.spec}")
    sft_config, aligned_config = sft.config.to_dict(), aligned.config.to_dict()
    for key in sorted(set(sft_config) | set(aligned_config)):
        if key not in _CONFIG_FIELDS_FREE and sft_config.get(key) != aligned_config.get(key):
            raise ExpoError(f"the pair differs in config field {key}: {sft_config.get(key)!r} in {sft.spec}, {aligned_config.get(key)!r} in {aligned.spec}")
    _verify_vocabulary(sft, aligned)


def _verify_vocabulary(sft: ModelSource, aligned: ModelSource) -> None:
    try:
        sft_vocab, aligned_vocab = sft.load_tokenizer().get_vocab(), aligned.load_tokenizer().get_vocab()
    except (OSError, ValueError):
        return  # a model without a tokenizer: the embedding shapes above are all there is to compare
    for token, index in sorted(sft_vocab.items(), key=lambda item: item[1]):
        if aligned_vocab.get(token) != index:
            raise ExpoError(f"the pair's vocabularies differ: token {token!r} is id {index} in {sft.spec} but {aligned_vocab.get(token)} in {aligned.spec}")
    if len(aligned_vocab) != len(sft_vocab):
        extra = next(t for t in aligned_vocab if t not in sft_vocab)
        raise ExpoError(f"the pair's vocabularies differ: token {extra!r} is only in {aligned.spec}")


def build_delta(
    sft: ModelSource,
    aligned: ModelSource,
    out: str | Path,
    *,
    encoding: str = "dense",
    rank: int = DEFAULT_RANK,
    group_size: int = DEFAULT_GROUP_SIZE,
    bits: float = DEFAULT_BITS,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress | None = None,
    distill: DistillConfig | None = None,
) -> dict:
    """Build the delta folder at `out` and return its manifest.

    `dtype` is the storage dtype of dense values and low-rank factors; by default each tensor
    keeps the SFT's storage dtype. Unchanged tensors are stored as `zero`, 1-D tensors dense.
    `distill` then refits the scales of the sign-bit tensors on calibration text (delta/distill.py).
    """
    if encoding not in ENCODINGS or encoding == "zero":
        raise ExpoError(f"unknown delta format {encoding!r}; choose one of dense, int8, int4, bit, lowrank, mixed")
    if encoding == "mixed" and not bits > 0:
        raise ExpoError(f"--bits must be positive, got {bits}")
    if dtype is not None and dtype not in DTYPES:
        raise ExpoError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    started = time.time()
    check_output_dir(out)  # before the pair check, which reads both tokenizers and configs
    verify_pair(sft, aligned)
    if distill is not None and encoding != "bit":
        raise ExpoError(f"--distill fits the scales of sign-bit tensors; use it with --format bit, not {encoding}")
    calibration = load_calibration(distill, aligned) if distill is not None else None  # a bad file fails before any work
    names = sft.parameter_names
    fingerprint = Fingerprint()
    tensors: dict[str, dict] = {}
    with atomic_output_dir(out) as folder:
        writer = ShardedWriter(folder, "delta", max_shard_bytes)
        try:
            for i, name in enumerate(names):
                if progress:
                    progress(i, len(names), name)
                base = sft.get(name)
                fingerprint.add(name, base)
                storage = DTYPES[dtype] if dtype else base.dtype
                delta = aligned.get(name).to(torch.float32) - base.to(torch.float32)
                del base
                chosen = "zero" if not torch.any(delta) else encoding
                encoded = encode_delta(delta, chosen, rank=rank, group_size=group_size, bits=bits, dtype=storage)
                parts = {}
                for part, tensor in encoded.parts().items():
                    parts[part] = f"{name}.{part}"
                    writer.add(parts[part], tensor)
                tensors[name] = {
                    "encoding": encoded.encoding,
                    "shape": list(encoded.shape),
                    "params": encoded.params(),
                    "parts": parts,
                    "stored_bytes": encoded.nbytes,
                    "rel_error": encoded.relative_error(delta) if encoded.encoding != "zero" else 0.0,
                    "delta_norm": float(delta.norm()),
                }
            weight_map = writer.close()
        except BaseException:
            writer.abort()
            raise
        for entry in tensors.values():  # a tensor's parts may straddle two shards
            entry["parts"] = {part: {"file": weight_map[key], "key": key} for part, key in entry["parts"].items()}
        aligned_meta = folder / ALIGNED_META
        aligned_meta.mkdir()
        aligned.save_metadata(aligned_meta)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"expo-serve {__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "architecture": sft.architecture,
            "config": aligned.config.to_dict(),
            "sft": {"source": sft.spec, "fingerprint": fingerprint.hexdigest()},
            "aligned": {"source": aligned.spec},
            "encoding": encoding,
            "dtype": dtype,
            "group_size": group_size if encoding == "int4" else None,
            "rank": rank if encoding == "lowrank" else None,
            "bits": bits if encoding == "mixed" else None,
            "tied": sft.tied,
            **({"layout": sft.delta_layout} if sft.delta_layout else {}),
            "build_seconds": round(time.time() - started, 3),
            "tensors": tensors,
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if distill is not None:
            manifest = distill_scales(sft, aligned, folder, distill, calibration)
    if progress:
        progress(len(names), len(names), "done")
    return manifest
