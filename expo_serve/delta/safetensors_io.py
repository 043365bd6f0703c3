"""Tensor-by-tensor safetensors reading and writing, so a 7B pair never sits in memory.

The `safetensors` package maps whole files and its writer takes a complete dict of tensors.
Building a delta or a merge wants the opposite: read one tensor with plain file reads (no
mapping that would count the whole file as resident), write one tensor, forget it. The format
is small (8-byte little-endian header length, a JSON header, then raw bytes), so both ends are
written here; files they produce are read by `safetensors` and Hugging Face as usual.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from ..errors import ExpoError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_COPY_CHUNK = 1024 * 1024  # small: the copy is sequential, and a big buffer would be the peak


class SafetensorsReader:
    """Random access to the tensors of one safetensors file, one plain read each."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise ExpoError(f"{self.path} is not a safetensors file: it is shorter than its 8-byte header length")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER_BYTES, size - 8):
                    raise ExpoError(f"{self.path} is truncated or not a safetensors file (header length {header_len} does not fit in {size} bytes)")
                header = json.loads(f.read(header_len))
        except OSError as exc:
            raise ExpoError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExpoError(f"{self.path} is not a safetensors file: its header is not valid JSON") from exc
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            code = info.get("dtype")
            if code not in _DTYPES:
                raise ExpoError(f"{self.path}: tensor {name} has dtype {code}, which expo-serve does not read")
            start, end = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
            if self._data_start + end > size:
                raise ExpoError(f"{self.path} is truncated: tensor {name} ends at byte {self._data_start + end} of a {size}-byte file")
            self._entries[name] = (_DTYPES[code], shape, int(start), int(end))
        self._mapped = None  # safe_open's handle, opened on the first sliced read

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self._entries[name]
        raw = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            got = f.readinto(memoryview(raw.numpy()))
        if got != end - start:
            raise ExpoError(f"{self.path} is truncated: tensor {name} is missing bytes")
        if dtype == torch.bool:
            return raw.view(torch.bool).reshape(shape)
        return raw.view(dtype).reshape(shape)

    def get_slice(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of a tensor, read through the memory-mapped
        `safe_open(...).get_slice`: only the slice's bytes are touched (a tensor-parallel rank's
        shard). dim None reads the whole tensor."""
        if dim is None:
            return self.get(name)
        if self._mapped is None:
            from safetensors import safe_open

            self._mapped = safe_open(str(self.path), framework="pt")
        view = self._mapped.get_slice(name)
        return (view[start:stop] if dim == 0 else view[:, start:stop]).contiguous()

    def sample(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """The values at flat positions `index` (a fingerprint's sample), each read from the
        memory-mapped file, so a sample of a large tensor costs a few pages, not the tensor."""
        import numpy as np

        dtype, shape, start, end = self._entries[name]
        size = torch.empty(0, dtype=dtype).element_size()
        mapped = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start + start, shape=(end - start,))
        offsets = index.numpy()[:, None] * size + np.arange(size)[None, :]
        raw = torch.from_numpy(np.ascontiguousarray(mapped[offsets.reshape(-1)]))
        return raw.view(dtype)


class StreamingSafetensorsWriter:
    """Writes one safetensors file a tensor at a time.

    The header must come first but is only known at the end, so raw bytes go to a side file
    while offsets are recorded; `close()` writes header plus bytes (one extra sequential copy,
    in exchange for memory that never holds more than the tensor being added).
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data.tmp")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, dict] = {}
        self._offset = 0
        self._metadata = dict(metadata or {})

    @property
    def nbytes(self) -> int:
        return self._offset

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in _CODES:
            raise ValueError(f"cannot write dtype {tensor.dtype} to safetensors")
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        self._data.write(memoryview(raw.numpy()))
        size = raw.numel()
        self._header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, self._offset + size]}
        self._offset += size

    def close(self) -> None:
        self._data.close()
        header = dict(self._header)
        if self._metadata:
            header["__metadata__"] = self._metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * ((-len(encoded)) % 8)  # the data section starts 8-byte aligned
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            shutil.copyfileobj(data, out, _COPY_CHUNK)
        self._data_path.unlink()

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)


class ShardedWriter:
    """Writes tensors into numbered safetensors shards of at most `max_shard_bytes` each.

    Files are named `{prefix}-0000i-of-0000n.safetensors` (or `{prefix}.safetensors` when one
    shard suffices), the Hugging Face convention; `close()` returns {tensor name: file name}.
    """

    def __init__(self, folder: Path, prefix: str, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata
        self._shards: list[tuple[Path, list[str]]] = []
        self._writer: StreamingSafetensorsWriter | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._writer is None or (self._writer.nbytes and self._writer.nbytes + size > self.max_shard_bytes):
            self._roll()
        self._writer.add(name, tensor)
        self._shards[-1][1].append(name)

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.folder / f"{self.prefix}-shard{len(self._shards) + 1}.tmp"
        self._writer = StreamingSafetensorsWriter(path, self.metadata)
        self._shards.append((path, []))

    def close(self) -> dict[str, str]:
        if self._writer is None:
            self._roll()
        self._writer.close()
        total = len(self._shards)
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, start=1):
            final = f"{self.prefix}.safetensors" if total == 1 else f"{self.prefix}-{i:05d}-of-{total:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
        return weight_map

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        for path, _ in self._shards:
            path.unlink(missing_ok=True)
