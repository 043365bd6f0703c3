"""Delta encodings: how Δ = θ_aligned − θ_sft is stored, and how it comes back.

Every encoding is a small class holding its stored parts as tensors. The kernels read those
parts directly (never a dequantized copy); `dequantize()` is the reference decode, and `rows()`
decodes only the rows an embedding lookup needs.

Layouts (N = output features, K = input features, a weight is [N, K] like nn.Linear):
  dense    delta  [N, K]                      in the storage dtype
  int8     q      [N, K] int8                 Δ ≈ q · scale[n]; scale = max|Δ[n]| / 127
           scale  [N] float32
  int4     packed [N, ceil(K/2)] uint8        two values a byte: k even in the low nibble,
           scale  [N, ceil(K/G)] float32      k odd in the high one; a nibble is q + 8 with
                                              q in [-8, 7]; Δ ≈ q · scale[n, k // G],
                                              scale = max|Δ| over the group / 7
  bit      packed [N, ceil(K/8)] uint8        bit (k % 8) of byte k // 8 is 1 where Δ > 0;
           scale  [N] float32                 Δ ≈ ±scale[n], scale initialised to mean|Δ[n]|
                                              as BitDelta does
  lowrank  a [R, K], b [N, R]                 Δ ≈ b @ a (truncated SVD, √S on both sides)
  zero     nothing                            Δ = 0 (the tensor did not change)

Scales are float32 whatever the storage dtype: a bf16 scale costs precision and an fp16 one
underflows on typical |Δ| (1e-5 and below), while their bytes are a rounding error (int4 at
group 128: 0.031 bytes a value against 0.5).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch

ENCODINGS = ("dense", "int8", "int4", "bit", "lowrank", "zero")
DEFAULT_GROUP_SIZE = 128
DEFAULT_RANK = 64
# Above this smaller dimension a full SVD costs minutes on a CPU; a seeded randomized SVD with
# oversampling and power iterations gets within a hair of the optimal error instead.
_FULL_SVD_MAX_DIM = 2048


@dataclass
class EncodedDelta(ABC):
    """Base class: the shape of the dense Δ and the named parts that store it."""

    shape: tuple[int, ...]
    encoding: ClassVar[str] = ""

    # -- what every encoding provides -------------------------------------------------------
    @abstractmethod
    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors, by part name (saved as '<param>.<part>' in safetensors)."""
        ...

    def params(self) -> dict:
        """Encoding parameters that the manifest records besides shape and parts."""
        return {}

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        ...

    @abstractmethod
    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows Δ[index] (for embedding lookups), without decoding the rest."""
        ...

    def zero_rows(self, rows: int) -> "EncodedDelta":
        """The all-zero Δ of `rows` rows in this encoding (to stand in for an unchanged shard)."""
        zeros = {name: torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device) for name, t in self.parts().items()}
        return from_parts(self.encoding, (rows, *self.shape[1:]), zeros, self.params())

    def join_rows(self, deltas: list["EncodedDelta"]) -> "EncodedDelta | None":
        """One Δ of this encoding whose rows are those of `deltas` (each this encoding or zero), or
        None where the encoding cannot join them. Rows are independent (per-row or per-row-group
        scales), so row blocks concatenate part by part."""
        members = [d if d.encoding != "zero" else self.zero_rows(d.shape[0]) for d in deltas]
        parts = {name: torch.cat([m.parts()[name] for m in members], dim=0) for name in self.parts()}
        return from_parts(self.encoding, (sum(d.shape[0] for d in deltas), *self.shape[1:]), parts, self.params())

    # -- shared behaviour -------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "EncodedDelta":
        """Move the parts; `dtype` recasts only floating parts that are not scales."""
        moved = {}
        for name, t in self.parts().items():
            cast = dtype if (dtype is not None and t.is_floating_point() and name != "scale") else None
            moved[name] = t.to(device=device, dtype=cast).contiguous()
        return from_parts(self.encoding, self.shape, moved, self.params())

    def relative_error(self, reference: torch.Tensor, chunk_elements: int = 1 << 18) -> float:
        """‖Δ − decode(encode(Δ))‖ / ‖Δ‖ in float64 (0 when Δ is zero).

        Decoded in blocks of rows, so measuring a large tensor costs little extra memory.
        """
        if reference.dim() < 2:
            reference = reference.reshape(-1, 1) if reference.dim() == 1 else reference.reshape(1, 1)
            decoded = self.dequantize(torch.float64).reshape(reference.shape)
            err_sq, ref_sq = float((decoded - reference.double()).square().sum()), float(reference.double().square().sum())
        else:
            step = max(1, chunk_elements // max(1, reference[0].numel()))
            err_sq = ref_sq = 0.0
            for start in range(0, reference.shape[0], step):
                index = torch.arange(start, min(start + step, reference.shape[0]), device=reference.device)
                ref = reference[index].double()
                err_sq += float((self.rows(index, torch.float64) - ref).square().sum())
                ref_sq += float(ref.square().sum())
        return 0.0 if ref_sq == 0.0 else (err_sq / ref_sq) ** 0.5


# ---------------------------------------------------------------------------------------------
@dataclass
class DenseDelta(EncodedDelta):
    delta: torch.Tensor = field(default=None)
    encoding: ClassVar[str] = "dense"

    def parts(self):
        return {"delta": self.delta}

    def dequantize(self, dtype=torch.float32):
        return self.delta.to(dtype)

    def rows(self, index, dtype=torch.float32):
        return self.delta[index].to(dtype)


@dataclass
class ZeroDelta(EncodedDelta):
    encoding: ClassVar[str] = "zero"

    def parts(self):
        return {}

    def dequantize(self, dtype=torch.float32):
        return torch.zeros(self.shape, dtype=dtype)

    def rows(self, index, dtype=torch.float32):
        return torch.zeros((*index.shape, *self.shape[1:]), dtype=dtype, device=index.device)

    def zero_rows(self, rows):
        return ZeroDelta(shape=(rows, *self.shape[1:]))


@dataclass
class Int8Delta(EncodedDelta):
    q: torch.Tensor = field(default=None)
    scale: torch.Tensor = field(default=None)
    encoding: ClassVar[str] = "int8"

    def parts(self):
        return {"q": self.q, "scale": self.scale}

    def dequantize(self, dtype=torch.float32):
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)

    def rows(self, index, dtype=torch.float32):
        return (self.q[index].to(torch.float32) * self.scale[index].unsqueeze(-1)).to(dtype)


@dataclass
class Int4Delta(EncodedDelta):
    packed: torch.Tensor = field(default=None)
    scale: torch.Tensor = field(default=None)
    group_size: int = DEFAULT_GROUP_SIZE
    encoding: ClassVar[str] = "int4"

    def parts(self):
        return {"packed": self.packed, "scale": self.scale}

    def params(self):
        return {"group_size": self.group_size}

    def zero_rows(self, rows):
        # A nibble holds q + 8: 0x88 is two zeros (a zero byte would decode to -8 · scale = 0 too,
        # but only while the scale is 0; this stays right whatever scale a caller sets).
        packed = torch.full((rows, self.packed.shape[1]), 0x88, dtype=torch.uint8, device=self.packed.device)
        scale = torch.zeros((rows, *self.scale.shape[1:]), dtype=self.scale.dtype, device=self.scale.device)
        return Int4Delta(shape=(rows, self.shape[1]), packed=packed, scale=scale, group_size=self.group_size)

    def join_rows(self, deltas):
        if any(d.encoding == "int4" and d.group_size != self.group_size for d in deltas):
            return None  # groups of different sizes do not share one scale layout
        return super().join_rows(deltas)

    def _decode(self, packed: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
        k = self.shape[1]
        low = (packed & 0x0F).to(torch.int16) - 8
        high = (packed >> 4).to(torch.int16) - 8
        q = torch.stack((low, high), dim=-1).flatten(-2)[..., :k]
        group_scale = scale.repeat_interleave(self.group_size, dim=-1)[..., :k]
        return (q.to(torch.float32) * group_scale).to(dtype)

    def dequantize(self, dtype=torch.float32):
        return self._decode(self.packed, self.scale, dtype)

    def rows(self, index, dtype=torch.float32):
        return self._decode(self.packed[index], self.scale[index], dtype)


@dataclass
class BitDelta(EncodedDelta):
    packed: torch.Tensor = field(default=None)
    scale: torch.Tensor = field(default=None)
    encoding: ClassVar[str] = "bit"

    def parts(self):
        return {"packed": self.packed, "scale": self.scale}

    def _decode(self, packed: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
        k = self.shape[1]
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :k]
        signs = bits.to(torch.float32) * 2.0 - 1.0
        return (signs * scale.unsqueeze(-1)).to(dtype)

    def dequantize(self, dtype=torch.float32):
        return self._decode(self.packed, self.scale, dtype)

    def rows(self, index, dtype=torch.float32):
        return self._decode(self.packed[index], self.scale[index], dtype)


@dataclass
class LowRankDelta(EncodedDelta):
    a: torch.Tensor = field(default=None)  # [R, K]
    b: torch.Tensor = field(default=None)  # [N, R]
    encoding: ClassVar[str] = "lowrank"

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def parts(self):
        return {"a": self.a, "b": self.b}

    def params(self):
        return {"rank": self.rank}

    def join_rows(self, deltas):
        """A stacked and B block-diagonal: the joined Δ is exactly [B₁·A₁; B₂·A₂; …], of rank
        R₁ + R₂ + …; a zero member adds rows of B and no rank."""
        members = [d for d in deltas if d.encoding == "lowrank"]
        rows, rank = sum(d.shape[0] for d in deltas), sum(d.rank for d in members)
        a = torch.cat([d.a for d in members], dim=0)
        b = torch.zeros((rows, rank), dtype=self.b.dtype, device=self.b.device)
        row = col = 0
        for d in deltas:
            if d.encoding == "lowrank":
                b[row:row + d.shape[0], col:col + d.rank] = d.b
                col += d.rank
            row += d.shape[0]
        return LowRankDelta(shape=(rows, self.shape[1]), a=a, b=b)

    def dequantize(self, dtype=torch.float32):
        return (self.b.to(torch.float32) @ self.a.to(torch.float32)).to(dtype)

    def rows(self, index, dtype=torch.float32):
        return (self.b[index].to(torch.float32) @ self.a.to(torch.float32)).to(dtype)


_CLASSES: dict[str, type[EncodedDelta]] = {
    cls.encoding: cls for cls in (DenseDelta, ZeroDelta, Int8Delta, Int4Delta, BitDelta, LowRankDelta)
}


def concat_rows(deltas: list[EncodedDelta], dense_dtype: torch.dtype) -> EncodedDelta:
    """One encoded Δ whose rows are those of `deltas`, in order (fused q/k/v, gate/up): joined in
    their common encoding, where zero members take that encoding's zero; all zero gives zero;
    mixed encodings, 1-D deltas, and what an encoding cannot join fall back to dense."""
    shape = (sum(d.shape[0] for d in deltas), *deltas[0].shape[1:])
    kinds = {d.encoding for d in deltas} - {"zero"}
    if not kinds:
        return ZeroDelta(shape=shape)
    if len(kinds) == 1 and len(shape) == 2:
        template = next(d for d in deltas if d.encoding != "zero")
        joined = template.join_rows(deltas)
        if joined is not None:
            return joined
    if kinds == {"dense"}:
        dense_dtype = next(d.delta.dtype for d in deltas if d.encoding == "dense")
    device = next(t.device for d in deltas for t in d.parts().values())  # a zero member has no tensor
    return DenseDelta(shape=shape, delta=torch.cat([d.dequantize(dense_dtype).to(device) for d in deltas], dim=0))


def from_parts(encoding: str, shape, parts: dict[str, torch.Tensor], params: dict | None = None) -> EncodedDelta:
    """Rebuild an encoded delta from its stored parts (the inverse of `parts()`/`params()`)."""
    if encoding not in _CLASSES:
        raise ValueError(f"unknown delta encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    cls = _CLASSES[encoding]
    kwargs = dict(parts)
    if encoding == "int4":
        kwargs["group_size"] = int((params or {}).get("group_size", DEFAULT_GROUP_SIZE))
    return cls(shape=tuple(int(s) for s in shape), **kwargs)


# ---------------------------------------------------------------------------------------------
def encode_delta(
    delta_weight: torch.Tensor,
    encoding: str = "dense",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    rank: int = DEFAULT_RANK,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> EncodedDelta:
    """Encode one Δ tensor. Arithmetic runs in float32; `dtype` is the storage dtype of the
    floating parts (dense values, low-rank factors), by default that of `delta_weight`.

    1-D tensors (norm weights, biases) have no compact encoding: they are always dense.
    """
    if encoding not in _CLASSES:
        raise ValueError(f"unknown delta encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    if not delta_weight.is_floating_point():
        raise TypeError(f"a delta must be floating point, got {delta_weight.dtype}")
    dtype = dtype or delta_weight.dtype
    shape = tuple(delta_weight.shape)
    if encoding == "zero":
        return ZeroDelta(shape=shape)
    if encoding == "dense" or delta_weight.dim() != 2:
        return DenseDelta(shape=shape, delta=delta_weight.to(dtype).contiguous())
    d = delta_weight.to(torch.float32)
    if encoding == "int8":
        return _encode_int8(d)
    if encoding == "int4":
        return _encode_int4(d, group_size)
    if encoding == "bit":
        return _encode_bit(d)
    return _encode_lowrank(d, rank, dtype, seed)


def _safe_divide(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, with 0 where the scale is 0 (an all-zero row or group)."""
    return torch.where(scale > 0, x / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(x))


def _encode_int8(d: torch.Tensor) -> Int8Delta:
    scale = d.abs().amax(dim=1) / 127.0
    q = torch.round(_safe_divide(d, scale[:, None])).clamp_(-127, 127).to(torch.int8)
    return Int8Delta(shape=tuple(d.shape), q=q.contiguous(), scale=scale.contiguous())


def _encode_int4(d: torch.Tensor, group_size: int) -> Int4Delta:
    if group_size <= 0:
        raise ValueError(f"int4 group size must be positive, got {group_size}")
    n, k = d.shape
    groups = math.ceil(k / group_size)
    padded = torch.zeros((n, groups * group_size), dtype=torch.float32, device=d.device)
    padded[:, :k] = d
    grouped = padded.view(n, groups, group_size)
    scale = grouped.abs().amax(dim=2) / 7.0
    q = torch.round(_safe_divide(grouped, scale[:, :, None])).clamp_(-8, 7).view(n, -1)[:, :k]
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8)
    if k % 2:
        nibbles = torch.cat([nibbles, torch.full((n, 1), 8, dtype=torch.uint8, device=d.device)], dim=1)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return Int4Delta(shape=(n, k), packed=packed.contiguous(), scale=scale.contiguous(), group_size=group_size)


def _encode_bit(d: torch.Tensor) -> BitDelta:
    n, k = d.shape
    scale = d.abs().mean(dim=1)
    bits = (d > 0).to(torch.uint8)
    pad = (-k) % 8
    if pad:
        bits = torch.cat([bits, torch.zeros((n, pad), dtype=torch.uint8, device=d.device)], dim=1)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=d.device)).to(torch.uint8)
    packed = (bits.view(n, -1, 8) * weights).sum(dim=2, dtype=torch.int32).to(torch.uint8)
    return BitDelta(shape=(n, k), packed=packed.contiguous(), scale=scale.contiguous())


def _encode_lowrank(d: torch.Tensor, rank: int, dtype: torch.dtype, seed: int) -> LowRankDelta:
    if rank <= 0:
        raise ValueError(f"low-rank rank must be positive, got {rank}")
    n, k = d.shape
    r = min(rank, n, k)
    if min(n, k) <= _FULL_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
    else:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(d, q=min(r + 16, n, k), niter=8)
        torch.random.set_rng_state(generator_state)
        vh = v.T
    root = s[:r].sqrt()
    b = (u[:, :r] * root).to(dtype).contiguous()
    a = (root[:, None] * vh[:r]).to(dtype).contiguous()
    return LowRankDelta(shape=(n, k), a=a, b=b)


# ---------------------------------------------------------------------------------------------
# Shards for tensor parallelism: the Δ of a block of output rows (a column-parallel layer, a
# vocabulary shard) or of input columns (a row-parallel layer), built from slices of the stored
# parts, so that a rank never reads a whole tensor. Per-output-row parts (int8/bit scales, int4
# scale rows, lowrank b) follow the rows; packed codes, int4 groups and lowrank a follow the
# columns. A column shard of lowrank keeps b whole: its partial product joins the all-reduce.

PartReader = Callable[[str, Optional[int], int, int], torch.Tensor]
"""read(part, dim, start, stop): the stored part, sliced [start, stop) along `dim` (None: whole)."""


def shard_delta(encoding: str, shape: tuple[int, ...], params: dict, read: PartReader, dim: int,
                start: int, stop: int) -> EncodedDelta:
    """The Δ of rows (dim 0) or columns (dim 1) [start, stop) of a stored encoded Δ of `shape`."""
    shape = tuple(int(s) for s in shape)
    width = stop - start
    shard_shape = (width, *shape[1:]) if dim == 0 else (shape[0], width)
    if encoding == "zero":
        return ZeroDelta(shape=shard_shape)
    if len(shape) == 1 or encoding == "dense":
        return DenseDelta(shape=shard_shape, delta=read("delta", dim, start, stop))
    if encoding == "lowrank":
        if dim == 0:
            return LowRankDelta(shape=shard_shape, a=read("a", None, 0, 0), b=read("b", 0, start, stop))
        return LowRankDelta(shape=shard_shape, a=read("a", 1, start, stop), b=read("b", None, 0, 0))
    if dim == 0:
        parts = {name: read(name, 0, start, stop) for name in PART_ORDER[encoding]}
        return from_parts(encoding, shard_shape, parts, params)
    if encoding == "int8":
        return Int8Delta(shape=shard_shape, q=read("q", 1, start, stop), scale=read("scale", None, 0, 0))
    if encoding == "int4":
        return _int4_columns(read, shape, int(params.get("group_size", DEFAULT_GROUP_SIZE)), start, stop)
    if encoding == "bit":
        return _bit_columns(read, shape, start, stop)
    raise ValueError(f"unknown delta encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")


PART_ORDER = {"dense": ("delta",), "int8": ("q", "scale"), "int4": ("packed", "scale"), "bit": ("packed", "scale"),
              "lowrank": ("a", "b")}


def _int4_columns(read: PartReader, shape, group_size: int, start: int, stop: int) -> Int4Delta:
    """Columns of int4: whole bytes when the shard starts and ends on one, else the nibbles are
    repacked. A shard that starts inside a group gets groups of gcd(G, start) columns, each
    with its parent group's scale: exact, and the same groups whenever G divides the start."""
    n, width = shape[0], stop - start
    packed = read("packed", 1, start // 2, (stop + 1) // 2)
    if start % 2 or (width % 2 and stop < shape[1]):
        nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)[:, start % 2: start % 2 + width]
        if width % 2:
            nibbles = torch.cat([nibbles, torch.full((n, 1), 8, dtype=torch.uint8, device=nibbles.device)], dim=1)
        packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    first_group = start // group_size
    scale = read("scale", 1, first_group, (stop - 1) // group_size + 1)
    local_group = math.gcd(group_size, start)
    if local_group != group_size:
        starts = torch.arange(start, stop, local_group, device=scale.device)
        scale = scale.index_select(1, starts // group_size - first_group)
    return Int4Delta(shape=(n, width), packed=packed.contiguous(), scale=scale.contiguous(), group_size=local_group)


def _bit_columns(read: PartReader, shape, start: int, stop: int) -> BitDelta:
    """Columns of bit: whole bytes when the shard starts on one (and ends on one or at K), else
    the signs are repacked."""
    n, width = shape[0], stop - start
    packed = read("packed", 1, start // 8, -(-stop // 8))
    if start % 8 or (width % 8 and stop < shape[1]):
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[:, start % 8: start % 8 + width]
        bits = torch.cat([bits, bits.new_zeros((n, (-width) % 8))], dim=1)
        weights = (1 << torch.arange(8, dtype=torch.int32, device=bits.device))
        packed = (bits.view(n, -1, 8).to(torch.int32) * weights).sum(dim=2).to(torch.uint8)
    return BitDelta(shape=(n, width), packed=packed.contiguous(), scale=read("scale", None, 0, 0))
