"""The Llama family with ExPO everywhere: Llama 2/3, Mistral (sliding window), Qwen2 (qkv bias).

The module tree mirrors the Hugging Face names, except that q/k/v fuse into `qkv_proj` and
gate/up into `gate_up_proj` (`PACKED_MODULES` maps them). Which biases exist is read from the
checkpoint's parameter names, so Qwen2's qkv bias and Llama's optional `attention_bias` /
`mlp_bias` need no special cases.

Attention runs over the paged KV cache.

The cache of one layer is [num_blocks, block_size, kv_heads, head_dim] for keys and for values.
Each step writes the new rows' keys and values into their slots, then every sequence attends to
its own blocks. The attention gathers each sequence's blocks into a padded batch and runs one
scaled-dot-product attention with a mask that is causal, bounded by the sequence's length and,
for sliding-window layers, by the window. Prefill, chunked prefill and decode rows share that one
path, so a batch may mix them.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ExpoEmbedding, ExpoLinear, ExpoRMSNorm, get_context


# -- rotary embeddings and paged attention ---------------------------------------------------------

def rope_parameters(config) -> dict:
    return getattr(config, "rope_parameters", None) or {}


def rope_inverse_frequencies(config) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention scaling) exactly as transformers computes them for this config; for
    dynamic NTK scaling those of sequences up to max_position_embeddings (base θ)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type == "default":
        base = rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = head_dim_of(config)
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type == "longrope":  # switches factors past a length: dynamic, and not implemented here
        raise ValueError("rope scaling type 'longrope' is not supported (its frequencies change past "
                         "original_max_position_embeddings)")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported (supported: default, "
                         f"{', '.join(ROPE_INIT_FUNCTIONS)})")
    return ROPE_INIT_FUNCTIONS[rope_type](config)


def dynamic_rope_limit(config) -> int | None:
    """max_position_embeddings when the model uses dynamic NTK scaling (its rows past it rotate at
    a base that depends on the sequence's length), else None."""
    return config.max_position_embeddings if rope_parameters(config).get("rope_type") == "dynamic" else None


def context_window(config) -> int:
    """Positions the model serves: max_position_embeddings, times the factor under dynamic NTK
    scaling (as vLLM does), which is what that scaling is for."""
    positions = int(getattr(config, "max_position_embeddings", 4096))
    if dynamic_rope_limit(config) is not None:
        return int(positions * rope_parameters(config)["factor"])
    return positions


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions, computed once.

    Under dynamic NTK scaling a step whose context says `rope_lens` (some sequence is longer than
    max_position_embeddings) rotates the rows of each such sequence at the base transformers
    computes for its length L: θ·(factor·L/max_pos − (factor−1))^(dim/(dim−2)). Its cos/sin are
    worked out once per step, not per layer."""

    def __init__(self, config, max_positions: int, device):
        super().__init__()
        inv_freq, scaling = rope_inverse_frequencies(config)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(device), persistent=False)
        self.dynamic_limit = dynamic_rope_limit(config)
        if self.dynamic_limit is not None:
            params = rope_parameters(config)
            self.base, self.factor = params["rope_theta"], params["factor"]
            self.dim = head_dim_of(config)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D], k [T, Hkv, D] rotated at their positions."""
        ctx = get_context()
        if ctx.rope_lens is None:
            cos, sin = self.cos[positions], self.sin[positions]
        else:
            cos, sin = ctx.memo("rotary", lambda: self._dynamic(positions, ctx))
        cos, sin = cos.to(q.dtype)[:, None, :], sin.to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def _dynamic(self, positions: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's cos/sin: from the table where its sequence's rope length is within
        max_position_embeddings, else at the base of that length, in float32 with the operations
        of transformers' _compute_dynamic_ntk_parameters and LlamaRotaryEmbedding.forward."""
        seq_len = ctx.rope_lens.clamp(min=self.dynamic_limit)
        dim, factor = self.dim, self.factor
        # One base per sequence at once: on a CPU the vectorized pow may round it one ulp off
        # transformers' scalar pow (far below float32's own error in position × inv_freq).
        base = self.base * ((factor * seq_len / self.dynamic_limit) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
        inv_freq = 1.0 / (base[:, None] ** exponents[None, :])  # [B, dim/2]
        freqs = positions.float()[:, None] * inv_freq[ctx.seq_index]
        emb = torch.cat((freqs, freqs), dim=-1)
        scaled = (ctx.rope_lens > self.dynamic_limit)[ctx.seq_index, None]
        return (torch.where(scaled, emb.cos(), self.cos[positions]),
                torch.where(scaled, emb.sin(), self.sin[positions]))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _triton_attention(device: torch.device) -> bool:
    """Decode reads blocks in place with the Triton kernel on CUDA (and under the interpreter)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.window = window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] for the new rows; returns [T, H·D]."""
        ctx = get_context()
        flat_k = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_k.index_copy_(0, ctx.slot_mapping, k)
        flat_v.index_copy_(0, ctx.slot_mapping, v)

        if ctx.is_decode_only and _triton_attention(q.device):
            from expo_kernels.paged_attention import paged_decode_attention

            out = paged_decode_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale, self.window)
            return out.reshape(out.shape[0], self.num_heads * self.head_dim)
        num_seqs, max_q, max_k = ctx.num_seqs, ctx.max_query_len, ctx.max_context_len
        keys = self.k_cache[ctx.block_tables].flatten(1, 2)[:, :max_k]  # [B, max_k, Hkv, D]
        values = self.v_cache[ctx.block_tables].flatten(1, 2)[:, :max_k]
        if ctx.is_decode_only:
            queries = q.unsqueeze(1)  # one row per sequence, in order
        else:
            queries = q.new_zeros(num_seqs, max_q, self.num_heads, self.head_dim)
            queries[ctx.seq_index, ctx.query_index] = q
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=ctx.attention_mask(self.window),
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        ).transpose(1, 2)  # [B, max_q, H, D]
        rows = out.squeeze(1) if ctx.is_decode_only else out[ctx.seq_index, ctx.query_index]
        return rows.reshape(rows.shape[0], self.num_heads * self.head_dim)


# -- the model -------------------------------------------------------------------------------------

# InternLM2 is read as Llama (delta/internlm2.py).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "InternLM2ForCausalLM")
PACKED_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def layer_window(config, index: int) -> int | None:
    """The sliding window of layer `index`, or None for full attention."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return config.sliding_window if layer_types[index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


def row_parallel(tp, in_features: int, shards: dict[str, int], **options) -> ExpoLinear:
    """o_proj, down_proj: split along their inputs under tensor parallelism (model/parallel.py)."""
    if tp is None:
        return ExpoLinear(in_features, shards, **options)
    from .parallel import RowParallelExpoLinear

    return RowParallelExpoLinear(tp, in_features, shards, **options)


class ExpoAttentionBlock(nn.Module):
    def __init__(self, config, prefix: str, params: set[str], index: int, rotary: RotaryEmbedding, dtype, device, tp=None):
        super().__init__()
        # Under tensor parallelism this rank's heads only (model/parallel.py).
        self.num_heads, self.num_kv_heads = ((config.num_attention_heads, config.num_key_value_heads) if tp is None
                                             else tp.local_heads(config)[:2])
        self.head_dim = head_dim_of(config)
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = ExpoLinear(config.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv},
                                   bias=f"{prefix}.q_proj.bias" in params, dtype=dtype, device=device)
        self.o_proj = row_parallel(tp, q, {"o_proj": config.hidden_size}, bias=f"{prefix}.o_proj.bias" in params,
                                   dtype=dtype, device=device)
        self.rotary = [rotary]  # shared by every layer; a list keeps it out of this module's children
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, layer_window(config, index))

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(h).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary[0](positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class ExpoMLP(nn.Module):
    def __init__(self, config, prefix: str, params: set[str], dtype, device, tp=None):
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"activation {config.hidden_act!r} is not supported (the Llama family uses silu)")
        inter = config.intermediate_size // (1 if tp is None else tp.size)
        self.gate_up_proj = ExpoLinear(config.hidden_size, {"gate_proj": inter, "up_proj": inter},
                                       bias=f"{prefix}.gate_proj.bias" in params, dtype=dtype, device=device)
        self.down_proj = row_parallel(tp, inter, {"down_proj": config.hidden_size}, bias=f"{prefix}.down_proj.bias" in params,
                                      dtype=dtype, device=device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class ExpoDecoderLayer(nn.Module):
    def __init__(self, config, index: int, params: set[str], rotary, dtype, device, tp=None):
        super().__init__()
        prefix = f"model.layers.{index}"
        eps = config.rms_norm_eps
        self.input_layernorm = ExpoRMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = ExpoAttentionBlock(config, f"{prefix}.self_attn", params, index, rotary, dtype, device, tp)
        self.post_attention_layernorm = ExpoRMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.mlp = ExpoMLP(config, f"{prefix}.mlp", params, dtype, device, tp)

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(positions, self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class ExpoDecoder(nn.Module):
    def __init__(self, config, params: set[str], max_positions: int, dtype, device, tp=None):
        super().__init__()
        if tp is None:
            self.embed_tokens = ExpoEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        else:
            from .parallel import VocabParallelEmbedding

            self.embed_tokens = VocabParallelEmbedding(tp, config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.rotary = RotaryEmbedding(config, max_positions, device)
        self.layers = nn.ModuleList(
            ExpoDecoderLayer(config, i, params, self.rotary, dtype, device, tp) for i in range(config.num_hidden_layers)
        )
        self.norm = ExpoRMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(token_ids)
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)


class ExpoForCausalLM(nn.Module):
    """Forward over a flat batch of token rows; logits only for the rows that need them.

    With `tp` (model/parallel.TensorParallel) this is one rank's shard: its heads, its share of the
    MLP and of the vocabulary; the logits of every rank are gathered on rank 0 (the others get
    an empty [R, 0])."""

    def __init__(self, config, params: list[str], tied_lm_head: bool, max_positions: int, dtype, device, tp=None):
        super().__init__()
        names = set(params)
        self.config = config
        self.tp = tp
        self.model = ExpoDecoder(config, names, max_positions, dtype, device, tp)
        self.tied_lm_head = tied_lm_head
        if not tied_lm_head and tp is None:
            self.lm_head = ExpoLinear(config.hidden_size, {"lm_head": config.vocab_size}, bias=False, dtype=dtype, device=device)
        elif not tied_lm_head:
            from .parallel import ParallelLMHead

            self.lm_head = ParallelLMHead(tp, config.hidden_size, {"lm_head": config.vocab_size // tp.size}, bias=False,
                                          dtype=dtype, device=device)

    @property
    def kv_heads(self) -> int:
        """Key/value heads of this rank's KV cache."""
        return self.model.layers[0].self_attn.num_kv_heads

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(token_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 for hidden rows, each at the α the step context gives its row (the
        runner publishes the context of just these rows: StepContext.rows)."""
        logits = self.model.embed_tokens.logits(hidden) if self.tied_lm_head else self.lm_head(hidden)
        return logits.float()

    # -- the α cache's merged weights (engine/model_runner.py, AlphaCache) -----------------------------------
    def _merged_holders(self) -> list[nn.Module]:
        """Every module whose product can run on merged weights: each linear, and a tied lm_head."""
        holders = [m for m in self.modules() if isinstance(m, ExpoLinear)]
        return holders + ([self.model.embed_tokens] if self.tied_lm_head else [])

    @property
    def has_delta(self) -> bool:
        return any(m.delta.encoding != "zero" for m in self._merged_holders())

    @property
    def alpha_slot_bytes(self) -> int:
        return sum(m.merged_bytes for m in self._merged_holders())

    def fill_alpha_slot(self, slot: int, alpha: float) -> None:
        for module in self._merged_holders():
            module.fill_alpha_slot(slot, alpha)

    def drop_alpha_slot(self, slot: int) -> None:
        for module in self._merged_holders():
            module.merged.pop(slot, None)

    def module_for(self, name: str) -> tuple[nn.Module, str, str]:
        """(module, shard, 'weight'|'bias') that loads the HF parameter `name`."""
        path, kind = name.rsplit(".", 1)
        parent, _, leaf = path.rpartition(".")
        if leaf in PACKED_MODULES:
            return self.get_submodule(f"{parent}.{PACKED_MODULES[leaf]}"), leaf, kind
        return self.get_submodule(path), leaf, kind
