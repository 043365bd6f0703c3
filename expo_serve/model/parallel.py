"""Tensor parallelism for the ExPO model, in Megatron's layout: which slice of every parameter
(θ_sft and Δ alike) a rank holds, and the layers that need the other ranks.

- q/k/v and gate/up are column-parallel: a rank holds a block of output rows (its attention heads,
  its share of the MLP), with their biases; nothing is exchanged.
- o_proj and down_proj are row-parallel: a rank holds a block of input columns, its partial
  products are summed by one all-reduce, and the bias (with its Δ) is added once, after it.
- The embedding is vocabulary-parallel: a rank looks up the tokens in its block of the
  vocabulary, zeros elsewhere, and one all-reduce sums the blocks (exact: one term is not zero).
- lm_head (or the tied embedding) is column-parallel over the vocabulary: each rank computes its
  block of logits and rank 0 gathers them.
- Key/value heads are split when there are at least as many as ranks; otherwise each rank keeps
  the one head its query heads read (replicated over the ranks that share it).
- Norms are replicated.

The engine imports this only with tensor_parallel_size > 1: a single rank never runs it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from expo_kernels import EncodedDelta, expo_linear

from ..errors import ExpoError
from .layers import ExpoEmbedding, ExpoLinear, get_context, linear_by_alpha, merge_at

Split = tuple[int, int, int]  # (dim, start, stop): rows (0) or columns (1) [start, stop)


@dataclass
class TensorParallel:
    """This process's rank among `size`, and the time it spends in collectives (rank 0 reports it:
    on a CPU the calls are synchronous, so it is the communication time of a step)."""

    rank: int
    size: int
    comm_seconds: float = 0.0
    comm_calls: int = 0
    group: object = field(default=None, repr=False)  # None: the default process group

    # -- the layout --------------------------------------------------------------------------
    @staticmethod
    def check(config, size: int) -> None:
        """Refuse, in one sentence, a model that cannot be split over `size` ranks."""
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        uneven = [f"{what} ({count})" for what, count in (("attention heads", heads), ("MLP width", config.intermediate_size),
                                                          ("vocabulary", config.vocab_size)) if count % size]
        if (kv >= size and kv % size) or (kv < size and size % kv):
            uneven.append(f"key/value heads ({kv}, which must divide by the ranks or divide them)")
        if uneven:
            raise ExpoError(f"tensor_parallel_size {size} cannot split this model: its " + ", ".join(uneven)
                            + f" do not divide evenly over {size} ranks")

    def local_heads(self, config) -> tuple[int, int, int]:
        """(query heads, key/value heads, first key/value head) of this rank."""
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        if kv >= self.size:
            return heads // self.size, kv // self.size, self.rank * (kv // self.size)
        return heads // self.size, 1, self.rank * kv // self.size

    def split(self, name: str, config) -> Split | None:
        """The slice of HF parameter `name` this rank holds (None: all of it)."""
        from .llama import head_dim_of

        path, kind = name.rsplit(".", 1)
        leaf = path.rsplit(".", 1)[-1]
        head_dim = head_dim_of(config)
        q_heads, kv_heads, kv_first = self.local_heads(config)
        inter = config.intermediate_size // self.size
        if leaf in ("embed_tokens", "lm_head"):
            vocab = config.vocab_size // self.size
            return 0, self.rank * vocab, (self.rank + 1) * vocab
        if leaf == "q_proj":
            return 0, self.rank * q_heads * head_dim, (self.rank + 1) * q_heads * head_dim
        if leaf in ("k_proj", "v_proj"):
            return 0, kv_first * head_dim, (kv_first + kv_heads) * head_dim
        if leaf in ("gate_proj", "up_proj"):
            return 0, self.rank * inter, (self.rank + 1) * inter
        if leaf == "o_proj" and kind == "weight":
            return 1, self.rank * q_heads * head_dim, (self.rank + 1) * q_heads * head_dim
        if leaf == "down_proj" and kind == "weight":
            return 1, self.rank * inter, (self.rank + 1) * inter
        if leaf.endswith("norm") or leaf in ("o_proj", "down_proj"):  # norms; row-parallel biases
            return None
        raise ExpoError(f"{name} has no tensor-parallel layout: expo-serve cannot split it")

    # -- the collectives ---------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        dist.all_reduce(tensor, group=self.group)
        self._count(started)
        return tensor

    def gather_columns(self, local: torch.Tensor) -> torch.Tensor:
        """Rank 0 gets every rank's block side by side ([R, V]); the others an empty [R, 0]."""
        started = time.perf_counter()
        local = local.contiguous()
        if self.rank == 0:
            blocks = [torch.empty_like(local) for _ in range(self.size)]
            dist.gather(local, blocks, dst=0, group=self.group)
            out = torch.cat(blocks, dim=-1)
        else:
            dist.gather(local, None, dst=0, group=self.group)
            out = local.new_empty((local.shape[0], 0))
        self._count(started)
        return out

    def _count(self, started: float) -> None:
        self.comm_seconds += time.perf_counter() - started
        self.comm_calls += 1


class RowParallelExpoLinear(ExpoLinear):
    """o_proj and down_proj: this rank's input columns of W and Δ (int4 groups, lowrank a follow
    them; lowrank b and per-row scales stay whole), one all-reduce of the partial products, then
    the whole bias b + (1+α)·Δb, once."""

    def __init__(self, tp: TensorParallel, in_features: int, shards: dict[str, int], **options):
        super().__init__(in_features, shards, **options)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(linear_by_alpha(x, self._fused, self.merged, self.out_features))
        if self.bias is None:
            return y
        if self.delta_bias is None:
            return y + self.bias
        # Per row, the bias as the reference merge forms it: b + Δb·(1+α) in float32.
        merged = self.bias.float()[None, :] + self.delta_bias.float()[None, :] * get_context().scale[:, None]
        return y + merged.to(y.dtype)

    def _fused(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return expo_linear(x, self.weight, self.delta, alpha)

    def fill_alpha_slot(self, slot: int, alpha: float) -> None:
        self.merged[slot] = (merge_at(self.weight, self.delta, alpha), None)


class ParallelLMHead(ExpoLinear):
    """An untied lm_head: this rank's block of the vocabulary; rank 0 gathers the logits."""

    def __init__(self, tp: TensorParallel, in_features: int, shards: dict[str, int], **options):
        super().__init__(in_features, shards, **options)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_columns(super().forward(x))


class VocabParallelEmbedding(ExpoEmbedding):
    """This rank's block of the vocabulary (E and ΔE rows): tokens outside it look up zeros, and
    one all-reduce sums the blocks. As a tied lm_head, its block of logits, gathered on rank 0."""

    def __init__(self, tp: TensorParallel, num_embeddings: int, dim: int, **options):
        super().__init__(num_embeddings // tp.size, dim, **options)
        self.tp = tp
        self.first = tp.rank * (num_embeddings // tp.size)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        local = token_ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = super().forward(local.masked_fill(outside, 0))
        return self.tp.all_reduce(rows.masked_fill(outside[:, None], 0.0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_columns(super().logits(hidden))


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of θ_sft and Δ this rank holds, measured from its tensors (merged α-cache slots and
    decoded caches excluded: they are working copies, not parameters)."""
    total = 0
    for module in model.modules():
        for tensor in list(module.parameters(recurse=False)):
            total += tensor.numel() * tensor.element_size()
        for attr in ("delta", "delta_bias"):
            value = getattr(module, attr, None)
            if isinstance(value, EncodedDelta):
                total += value.nbytes
            elif isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


