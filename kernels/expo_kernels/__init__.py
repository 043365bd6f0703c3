"""ExPO kernels: delta encodings and the fused linear y = x·Wᵀ + (1+α_row)·x·Δᵀ."""
from .encode import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    DEFAULT_RANK,
    ENCODINGS,
    BitDelta,
    DenseDelta,
    EncodedDelta,
    Int4Delta,
    Int8Delta,
    LowRankDelta,
    MixedDelta,
    ZeroDelta,
    concat_rows,
    encode_delta,
    from_parts,
    shard_delta,
)
from .linear import BACKENDS, DECODE_MAX_M, expo_linear
from .reference import reference_linear

__all__ = [
    "BACKENDS",
    "DECODE_MAX_M",
    "DEFAULT_BITS",
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_RANK",
    "ENCODINGS",
    "BitDelta",
    "DenseDelta",
    "EncodedDelta",
    "Int4Delta",
    "Int8Delta",
    "LowRankDelta",
    "MixedDelta",
    "ZeroDelta",
    "concat_rows",
    "encode_delta",
    "expo_linear",
    "from_parts",
    "reference_linear",
    "shard_delta",
]
