"""The delta folder (DESIGN.md §4): `expo_delta.json` plus safetensors shards.

Manifest fields:
  format, format_version      "expo-delta", 1
  architecture, config        of the pair (the aligned model's config)
  sft, aligned                {"source": ..., "fingerprint": ...} (the SFT fingerprint guards loading)
  encoding, dtype, group_size, rank, bits   what `delta build` was asked for (bits: `mixed`)
  tied                        {alias: canonical}; a tied tensor is stored once, under canonical
  distillation                (only after `--distill`) the recipe and the loss before and after
                              the bit scales were refitted (delta/distill.py)
  layout                      (only when tensors are not stored under the checkpoint's own names)
                              how they are stored: InternLM2's are under Llama names, wqkv cut
                              into q/k/v and each part encoded on its own (delta/internlm2.py)
  tensors                     {parameter: {"encoding", "shape", "params", "parts": {part:
                              {"file", "key"}}, "stored_bytes", "rel_error", "delta_norm"}}
The aligned model's config, generation config and tokenizer files sit in `aligned_meta/`, so a
merge or a server can use them without the aligned checkpoint (as the reference script does).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from expo_kernels import EncodedDelta, from_parts, shard_delta

from ..errors import ExpoError
from .safetensors_io import SafetensorsReader

MANIFEST = "expo_delta.json"
ALIGNED_META = "aligned_meta"
FORMAT = "expo-delta"
FORMAT_VERSION = 1

_SAMPLES_PER_TENSOR = 4096


class Fingerprint:
    """A digest of a model's weights that survives a change of storage dtype.

    Per parameter: its name, its shape, and up to 4096 evenly spaced values rounded to bf16
    (so the fp32 and bf16 copies of one model agree while any real fine-tune differs).
    Parameters are fed in sorted order, so the reading order does not matter.
    """

    def __init__(self):
        self._parts: dict[str, bytes] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        index = self.sample_index(flat.numel())
        self.add_sample(name, tuple(tensor.shape), flat if index is None else flat[index.to(flat.device)])

    @staticmethod
    def sample_index(numel: int) -> torch.Tensor | None:
        """The flat positions sampled from a tensor of `numel` values (None: all of them)."""
        if numel <= _SAMPLES_PER_TENSOR:
            return None
        return torch.linspace(0, numel - 1, _SAMPLES_PER_TENSOR, dtype=torch.float64).round().long()

    def add_sample(self, name: str, shape: tuple[int, ...], values: torch.Tensor) -> None:
        """Add a parameter from its sampled values alone (a tensor-parallel rank reads no whole tensor)."""
        sample = values.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
        self._parts[name] = f"{name}:{tuple(shape)}:".encode() + hashlib.sha256(sample).digest()

    def hexdigest(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self._parts):
            digest.update(self._parts[name])
        return digest.hexdigest()


def fingerprint_source(source) -> str:
    fp = Fingerprint()
    for name in source.parameter_names:
        fp.add(name, source.get(name))
    return fp.hexdigest()


@dataclass
class DeltaEntry:
    name: str
    encoding: str
    shape: tuple[int, ...]
    params: dict
    parts: dict[str, dict[str, str]]  # part -> {"file", "key"}


class DeltaCheckpoint:
    """A delta folder opened for reading: the manifest, and each tensor's encoded Δ on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ExpoError(f"{self.folder} is not an expo-serve delta: it has no {MANIFEST}")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ExpoError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if self.manifest.get("format") != FORMAT:
            raise ExpoError(f"{path} is not an expo-serve delta manifest")
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ExpoError(f"{path} has delta format version {version}; this expo-serve reads version {FORMAT_VERSION}")
        self.entries = {
            name: DeltaEntry(name, e["encoding"], tuple(e["shape"]), e.get("params", {}), e.get("parts", {}))
            for name, e in self.manifest["tensors"].items()
        }
        self._readers: dict[str, SafetensorsReader] = {}

    @property
    def sft_fingerprint(self) -> str:
        return self.manifest["sft"]["fingerprint"]

    @property
    def tied(self) -> dict[str, str]:
        return self.manifest.get("tied", {})

    @property
    def aligned_meta(self) -> Path:
        return self.folder / ALIGNED_META

    def _reader(self, file: str) -> SafetensorsReader:
        if file not in self._readers:
            path = self.folder / file
            if not path.is_file():
                raise ExpoError(f"{self.folder} is incomplete: {file} is missing")
            self._readers[file] = SafetensorsReader(path)
        return self._readers[file]

    def load(self, name: str) -> EncodedDelta:
        entry = self.entries[name]
        parts = {}
        for part, where in entry.parts.items():
            reader = self._reader(where["file"])
            if where["key"] not in reader:
                raise ExpoError(f"{self.folder / where['file']} lacks {where['key']}: the delta is incomplete")
            parts[part] = reader.get(where["key"])
        return from_parts(entry.encoding, entry.shape, parts, entry.params)

    def load_shard(self, name: str, dim: int, start: int, stop: int) -> EncodedDelta:
        """The Δ of rows (dim 0) or columns (dim 1) [start, stop) of a tensor, from slices of its
        stored parts (a tensor-parallel rank's shard; expo_kernels.shard_delta says which)."""
        entry = self.entries[name]

        def read(part: str, part_dim: int | None, part_start: int, part_stop: int) -> torch.Tensor:
            where = entry.parts[part]
            reader = self._reader(where["file"])
            if where["key"] not in reader:
                raise ExpoError(f"{self.folder / where['file']} lacks {where['key']}: the delta is incomplete")
            return reader.get_slice(where["key"], part_dim, part_start, part_stop)

        return shard_delta(entry.encoding, entry.shape, entry.params, read, dim, start, stop)

    def __iter__(self) -> Iterator[tuple[str, EncodedDelta]]:
        for name in self.entries:
            yield name, self.load(name)

    def check_base(self, fingerprint: str, sft_spec: str) -> None:
        """Refuse a base model other than the one the delta was built from."""
        if fingerprint != self.sft_fingerprint:
            raise ExpoError(
                f"the delta in {self.folder} was built on another base model than {sft_spec} "
                f"(it expects {self.manifest['sft'].get('source')!s}, fingerprint {self.sft_fingerprint[:12]}…, "
                f"but {sft_spec} has {fingerprint[:12]}…)"
            )

    def check_layout(self, source) -> None:
        """Cheap checks before any weight is read: architecture and every tensor's shape."""
        if source.architecture != self.manifest["architecture"]:
            raise ExpoError(f"the delta in {self.folder} is for {self.manifest['architecture']}, but {source.spec} is {source.architecture}")
        expected = set(source.parameter_names)
        for name in expected - set(self.entries):
            raise ExpoError(f"the delta in {self.folder} has no tensor {name} that {source.spec} needs")
        for name, entry in self.entries.items():
            if name not in expected:
                raise ExpoError(f"the delta in {self.folder} holds {name}, which {source.spec} does not have")
            if tuple(source.shape(name)) != entry.shape:
                raise ExpoError(f"{name} is {list(source.shape(name))} in {source.spec} but {list(entry.shape)} in the delta")
