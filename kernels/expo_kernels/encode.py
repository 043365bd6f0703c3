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
  mixed    per band of width w in (8, 4, 2)   Δ ≈ b @ a as lowrank, the singular vectors split
           (a band of rank 0 has no parts):   into bands at decreasing bit widths (Delta-CoMe):
           a{w}       [ceil(r/p), K] uint8    the top vectors at 8 bits, the next at 4, then 2,
           b{w}       [N, ceil(r/p)] uint8    the tail dropped. p = 8 // w codes a byte, packed
           a{w}_scale [r] float32             along the RANK (vector j of a band is in byte
           b{w}_scale [r] float32             j // p, bits (j % p)·w), so row and column shards
                                              of Δ slice whole bytes of b and a. A code holds
                                              q + 2^(w-1), q in [-2^(w-1), 2^(w-1) - 1]
                                              (symmetric: no zero point; 0 is a code, so a
                                              block-diagonal join of b has exact zeros);
                                              a[j] ≈ q · a{w}_scale[j] per row of a, b[:, j] ≈
                                              q · b{w}_scale[j] per column of b. The band ranks
                                              fit a budget of `bits` per parameter of Δ, codes
                                              and scales counted (see _allocate_bands).
  zero     nothing                            Δ = 0 (the tensor did not change)

Scales are float32 whatever the storage dtype: a bf16 scale costs precision and an fp16 one
underflows on typical |Δ| (1e-5 and below), while their bytes are a rounding error (int4 at
group 128: 0.031 bytes a value against 0.5).
"""
from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch

ENCODINGS = ("dense", "int8", "int4", "bit", "lowrank", "mixed", "zero")
DEFAULT_GROUP_SIZE = 128
DEFAULT_RANK = 64
# Above this smaller dimension a full SVD costs minutes on a CPU; a seeded randomized SVD with
# oversampling and power iterations gets within a hair of the optimal error instead.
_FULL_SVD_MAX_DIM = 2048
DEFAULT_BITS = 1.0  # mixed: bits per parameter of Δ
# mixed: the band widths, most significant singular vectors first. Each divides 8, so a code never
# straddles a byte and unpacking is one shift and one mask (3 or 6 bits would straddle bytes).
MIXED_WIDTHS = (8, 4, 2)
# mixed: at most this many singular vectors are candidates for the bands (what the SVD computes).
# At 1 bit a parameter a 4096x4096 layer affords 1023 vectors at 2 bits, about this cap; a larger
# rank would make the randomized SVD of a big matrix cost minutes on a CPU.
MIXED_MAX_RANK = 1024


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


def _zero_code(width: int) -> int:
    """The stored code of q = 0 at `width` bits (codes hold q + 2^(width-1))."""
    return 1 << (width - 1)


def _pack_codes(codes: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """uint8 codes (each < 2^width) packed p = 8 // width a byte along `dim`: code j of a byte in
    bits (j % p)·width; the last byte padded with the zero code."""
    per_byte = 8 // width
    c = codes.movedim(dim, -1).to(torch.int32)
    pad = (-c.shape[-1]) % per_byte
    if pad:
        c = torch.cat([c, c.new_full((*c.shape[:-1], pad), _zero_code(width))], dim=-1)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=c.device) * width
    packed = (c.reshape(*c.shape[:-1], -1, per_byte) << shifts).sum(dim=-1).to(torch.uint8)
    return packed.movedim(-1, dim).contiguous()


def _unpack_codes(packed: torch.Tensor, width: int, count: int, dim: int) -> torch.Tensor:
    """The signed integers q (int16) of the first `count` codes packed along `dim`."""
    per_byte = 8 // width
    p = packed.movedim(dim, -1).to(torch.int16)
    shifts = torch.arange(per_byte, dtype=torch.int16, device=p.device) * width
    codes = ((p.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).flatten(-2)[..., :count]
    return (codes - _zero_code(width)).movedim(-1, dim)


# id(delta) -> (the part versions it was decoded from, {(what, dtype): decoded}); an entry leaves
# when its delta is garbage-collected.
_DECODED: dict[int, tuple[tuple, dict]] = {}


def decoded_once(delta: EncodedDelta, what: str, dtype: torch.dtype, decode: Callable[[], object]):
    """`decode()` of a delta (its dense Δ, its factors, …), computed on first use and kept while the
    delta lives, per (what, dtype); done again if one of its parts was modified in place since."""
    key = id(delta)
    versions = tuple(p._version for p in delta.parts().values())
    entry = _DECODED.get(key)
    if entry is None or entry[0] != versions:
        if entry is None:
            weakref.finalize(delta, _DECODED.pop, key, None)
        entry = (versions, {})
        _DECODED[key] = entry
    if (what, dtype) not in entry[1]:
        entry[1][(what, dtype)] = decode()
    return entry[1][(what, dtype)]


@dataclass
class MixedDelta(EncodedDelta):
    """Low-rank Δ ≈ b @ a with its singular vectors in bands of 8, 4 and 2 bits (layout in the
    module docstring). `stored` holds the parts by name; `bits` is the budget it was built for."""

    stored: dict = field(default_factory=dict)
    bits: float = DEFAULT_BITS
    encoding: ClassVar[str] = "mixed"

    @property
    def band_ranks(self) -> dict[int, int]:
        """{width: rank} for the widths of MIXED_WIDTHS, 0 where the band is absent."""
        return {w: int(self.stored[f"a{w}_scale"].shape[0]) if f"a{w}_scale" in self.stored else 0
                for w in MIXED_WIDTHS}

    @property
    def rank(self) -> int:
        return sum(self.band_ranks.values())

    def parts(self):
        return {name: self.stored[name] for name in _mixed_part_names(self.band_ranks)}

    def params(self):
        return {"bits": self.bits, "bands": [{"bits": w, "rank": r} for w, r in self.band_ranks.items()]}

    def to(self, device=None, dtype=None):
        """Move the parts; codes and scales keep their dtypes (dtype is the compute dtype's
        business: the factors are dequantized to it when used)."""
        moved = {name: t.to(device=device).contiguous() for name, t in self.stored.items()}
        return MixedDelta(shape=self.shape, stored=moved, bits=self.bits)

    def zero_rows(self, rows):
        return MixedDelta(shape=(rows, self.shape[1]), stored={}, bits=self.bits)

    def join_rows(self, deltas):
        """As lowrank: per band, a's vectors stacked and b block-diagonal (its off-block codes are
        the zero code, so exact zeros); a zero member adds rows of b and no vectors."""
        rows = sum(d.shape[0] for d in deltas)
        members = [d for d in deltas if d.encoding == "mixed"]
        stored = {}
        for w in MIXED_WIDTHS:
            ranks = [m.band_ranks[w] for m in members]
            total = sum(ranks)
            if total == 0:
                continue
            device = next(m.stored[f"a{w}"].device for m, r in zip(members, ranks) if r)
            a_codes = [_unpack_codes(m.stored[f"a{w}"], w, r, 0) for m, r in zip(members, ranks) if r]
            b_codes = torch.zeros((rows, total), dtype=torch.int16, device=device)
            row = col = 0
            for d in deltas:
                r = d.band_ranks[w] if d.encoding == "mixed" else 0
                if r:
                    b_codes[row:row + d.shape[0], col:col + r] = _unpack_codes(d.stored[f"b{w}"], w, r, 1)
                    col += r
                row += d.shape[0]
            zero = _zero_code(w)
            stored[f"a{w}"] = _pack_codes((torch.cat(a_codes, dim=0) + zero).to(torch.uint8), w, 0)
            stored[f"b{w}"] = _pack_codes((b_codes + zero).to(torch.uint8), w, 1)
            for side in "ab":
                stored[f"{side}{w}_scale"] = torch.cat([m.stored[f"{side}{w}_scale"] for m, r in zip(members, ranks) if r])
        return MixedDelta(shape=(rows, self.shape[1]), stored=stored, bits=self.bits)

    def _band_factors(self, b_rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [R, K], b [N, R]) dequantized in float32, bands in order; b only at `b_rows`."""
        n, k = self.shape
        device = next((t.device for t in self.stored.values()), torch.device("cpu"))
        a_parts, b_parts = [torch.zeros((0, k), device=device)], []
        for w, r in self.band_ranks.items():
            if not r:
                continue
            a_parts.append(_unpack_codes(self.stored[f"a{w}"], w, r, 0).to(torch.float32)
                           * self.stored[f"a{w}_scale"].to(torch.float32)[:, None])
            packed_b = self.stored[f"b{w}"] if b_rows is None else self.stored[f"b{w}"][b_rows]
            b_parts.append(_unpack_codes(packed_b, w, r, packed_b.dim() - 1).to(torch.float32)
                           * self.stored[f"b{w}_scale"].to(torch.float32))
        lead = (n,) if b_rows is None else tuple(torch.as_tensor(b_rows).shape)
        b = torch.cat(b_parts, dim=-1) if b_parts else torch.zeros((*lead, 0), device=device)
        return torch.cat(a_parts, dim=0), b

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [R, K], b [N, R]) in `dtype` on the parts' device: the dequantized bands, decoded
        once per dtype and kept (they are r·(N + K) values, not N·K), re-decoded if a part was
        modified in place since."""
        return decoded_once(self, "factors", dtype,
                            lambda: tuple(t.to(dtype).contiguous() for t in self._band_factors()))

    def dequantize(self, dtype=torch.float32):
        a, b = self._band_factors()
        if dtype == torch.float64:
            a, b = a.double(), b.double()
        return (b @ a).to(dtype)

    def rows(self, index, dtype=torch.float32):
        a, b = self._band_factors(index)
        if dtype == torch.float64:
            a, b = a.double(), b.double()
        return (b @ a).to(dtype)


def _mixed_part_names(band_ranks: dict[int, int]) -> list[str]:
    return [f"{name}{w}{suffix}" for w, r in band_ranks.items() if r
            for name, suffix in (("a", ""), ("b", ""), ("a", "_scale"), ("b", "_scale"))]


_CLASSES: dict[str, type[EncodedDelta]] = {
    cls.encoding: cls for cls in (DenseDelta, ZeroDelta, Int8Delta, Int4Delta, BitDelta, LowRankDelta, MixedDelta)
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
    if encoding == "mixed":  # the bands are read off the parts present
        kwargs = {"stored": dict(parts), "bits": float((params or {}).get("bits", DEFAULT_BITS))}
    return cls(shape=tuple(int(s) for s in shape), **kwargs)


# ---------------------------------------------------------------------------------------------
def encode_delta(
    delta_weight: torch.Tensor,
    encoding: str = "dense",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    rank: int = DEFAULT_RANK,
    bits: float = DEFAULT_BITS,
    band_ranks: tuple[int, int, int] | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> EncodedDelta:
    """Encode one Δ tensor. Arithmetic runs in float32; `dtype` is the storage dtype of the
    floating parts (dense values, low-rank factors), by default that of `delta_weight`.

    mixed: `bits` per parameter of Δ is the budget the encoder fits its bands into; `band_ranks`
    (ranks of the 8-, 4- and 2-bit bands) overrides that choice (for tests and experiments).

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
    if encoding == "mixed":
        return _encode_mixed(d, bits, band_ranks, seed)
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


def _svd_factors(d: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-r truncated SVD of d as float32 factors (a [r, K], b [N, r]), √S on both sides."""
    n, k = d.shape
    if min(n, k) <= _FULL_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
    else:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(d, q=min(r + 16, n, k), niter=8)
        torch.random.set_rng_state(generator_state)
        vh = v.T
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root


def _encode_lowrank(d: torch.Tensor, rank: int, dtype: torch.dtype, seed: int) -> LowRankDelta:
    if rank <= 0:
        raise ValueError(f"low-rank rank must be positive, got {rank}")
    n, k = d.shape
    a, b = _svd_factors(d, min(rank, n, k), seed)
    return LowRankDelta(shape=(n, k), a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous())


# Clipping ratios tried per singular vector below 8 bits: the scale is max|v|·ratio / qmax with
# the lowest squared error (at 2 bits clipping the few large entries of a vector halves its error).
_CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.42, 0.35, 0.3)


def _quantize_vectors(v: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of v [r, L] at `width` bits: (q int16 [r, L], scale float32
    [r]), q in [-2^(w-1), 2^(w-1) - 1], v ≈ q · scale. The scale minimises ‖v − q·scale‖ over the
    clipping ratios (8 bits: no clipping)."""
    qmax, qmin = (1 << (width - 1)) - 1, -(1 << (width - 1))
    top = v.abs().amax(dim=1)
    best_q, best_scale, best_err = None, None, None
    for ratio in (_CLIP_RATIOS if width < 8 else (1.0,)):
        scale = top * ratio / qmax
        q = torch.round(_safe_divide(v, scale[:, None])).clamp_(qmin, qmax)
        err = (v - q * scale[:, None]).square().sum(dim=1)
        if best_q is None:
            best_q, best_scale, best_err = q, scale, err
        else:
            better = err < best_err
            best_q = torch.where(better[:, None], q, best_q)
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.minimum(err, best_err)
    return best_q.to(torch.int16), best_scale.to(torch.float32)


def _band_bytes(width: int, rank: int, n: int, k: int) -> int:
    """What a band stores: the packed codes of a and b, and two float32 scales a vector."""
    return math.ceil(rank * width / 8) * (n + k) + 8 * rank


def _allocate_bands(gains: dict[int, torch.Tensor], budget: int, n: int, k: int) -> tuple[int, int, int]:
    """Ranks (r8, r4, r2) of the 8-, 4- and 2-bit bands within `budget` bytes that keep the most
    of ‖Δ‖²: vector j in a band of width w keeps gains[w][j] = σ_j² − ‖b_j·a_j − b̂_j·âⱼ‖² (its
    energy less its measured quantization error; dropped, it keeps 0). The bands take consecutive
    vectors, most significant first, at falling widths. Every (r8, r4) is tried, r2 filling what
    remains; r4 is even and r2 a multiple of 4 so that no byte is half empty."""
    total = gains[8].shape[0]
    cum = {w: torch.cat([torch.zeros(1, dtype=torch.float64), g.double().cumsum(0)]) for w, g in gains.items()}
    per = {w: w * (n + k) / 8 + 8 for w in MIXED_WIDTHS}  # bytes a vector, exact on whole bytes
    r8 = torch.arange(0, min(total, int(budget // per[8])) + 1)[:, None]
    r4 = torch.arange(0, min(total, int(budget // per[4])) + 1, 2)[None, :]
    left = budget - r8 * per[8] - r4 * per[4]
    r2 = torch.minimum((left / per[2]).floor().long(), total - r8 - r4).clamp(min=0) // 4 * 4
    ok = (left >= 0) & (r8 + r4 <= total)
    i4, i2 = (r8 + r4).clamp(max=total), (r8 + r4 + r2).clamp(max=total)
    kept = cum[8][r8] + cum[4][i4] - cum[4][r8] + cum[2][i2] - cum[2][i4]
    kept = torch.where(ok, kept, torch.full_like(kept, -math.inf))
    best = int(kept.argmax())
    j8, j4 = divmod(best, kept.shape[1])
    return int(r8[j8, 0]), int(r4[0, j4]), int(r2[j8, j4])


def _encode_mixed(d: torch.Tensor, bits: float, band_ranks, seed: int) -> MixedDelta:
    """Truncated SVD, then each kept singular vector (a row of a, a column of b, √S on both
    sides) quantized at its band's width with its own float32 scale."""
    if not bits > 0:
        raise ValueError(f"mixed needs a positive bits per parameter, got {bits}")
    n, k = d.shape
    budget = int(bits * n * k // 8)  # bytes
    if band_ranks is not None:
        ranks = tuple(int(r) for r in band_ranks)
        if len(ranks) != len(MIXED_WIDTHS) or min(ranks) < 0 or sum(ranks) > min(n, k):
            raise ValueError(f"band_ranks must be {len(MIXED_WIDTHS)} ranks summing to at most {min(n, k)}, got {band_ranks}")
        candidates = sum(ranks)
    else:
        candidates = min(n, k, MIXED_MAX_RANK, int(budget // (2 * (n + k) / 8 + 8)))
    if candidates == 0:
        return MixedDelta(shape=(n, k), stored={}, bits=float(bits))
    a, b = _svd_factors(d, candidates, seed)
    quantized = {w: (_quantize_vectors(a, w), _quantize_vectors(b.T.contiguous(), w)) for w in MIXED_WIDTHS}
    if band_ranks is None:
        energy = a.double().square().sum(1) * b.double().square().sum(0)
        gains = {}
        for w, ((qa, sa), (qb, sb)) in quantized.items():
            a_hat, b_hat = qa * sa[:, None], qb * sb[:, None]  # b_hat is bᵀ's rows
            cross = (a.double() * a_hat.double()).sum(1) * (b.T.double() * b_hat.double()).sum(1)
            hat = a_hat.double().square().sum(1) * b_hat.double().square().sum(1)
            gains[w] = energy - (energy + hat - 2 * cross)  # σ² − ‖b aᵀ − b̂ âᵀ‖²
        ranks = _allocate_bands(gains, budget, n, k)
    stored, start = {}, 0
    for w, r in zip(MIXED_WIDTHS, ranks):
        if r:
            (qa, sa), (qb, sb) = quantized[w]
            zero = _zero_code(w)
            stored[f"a{w}"] = _pack_codes((qa[start:start + r] + zero).to(torch.uint8), w, 0)
            stored[f"b{w}"] = _pack_codes((qb[start:start + r].T + zero).to(torch.uint8), w, 1)
            stored[f"a{w}_scale"] = sa[start:start + r].contiguous()
            stored[f"b{w}_scale"] = sb[start:start + r].contiguous()
        start += r
    return MixedDelta(shape=(n, k), stored=stored, bits=float(bits))


# ---------------------------------------------------------------------------------------------
# Shards for tensor parallelism: the Δ of a block of output rows (a column-parallel layer, a
# vocabulary shard) or of input columns (a row-parallel layer), built from slices of the stored
# parts, so that a rank never reads a whole tensor. Per-output-row parts (int8/bit scales, int4
# scale rows, lowrank b) follow the rows; packed codes, int4 groups and lowrank a follow the
# columns. A column shard of lowrank keeps b whole: its partial product joins the all-reduce.
# mixed is lowrank with its codes packed along the rank, so its shards slice whole bytes the same way.

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
    if encoding == "mixed":  # codes are packed along the rank: whole bytes of b's rows, a's columns
        names = _mixed_part_names({int(band["bits"]): int(band["rank"]) for band in params.get("bands", [])})
        side = "b" if dim == 0 else "a"
        stored = {name: read(name, dim, start, stop) if name.startswith(side) and not name.endswith("_scale")
                  else read(name, None, 0, 0) for name in names}
        return MixedDelta(shape=shard_shape, stored=stored, bits=float(params.get("bits", DEFAULT_BITS)))
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
