"""The Llama family with ExPO everywhere: Llama 2/3, Mistral (sliding window), Qwen2 (qkv bias).

The module tree mirrors the Hugging Face names, except that q/k/v fuse into `qkv_proj` and
gate/up into `gate_up_proj` (`PACKED_MODULES` maps them). Which biases exist is read from the
checkpoint's parameter names, so Qwen2's qkv bias and Llama's optional `attention_bias` /
`mlp_bias` need no special cases.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PagedAttention, RotaryEmbedding, head_dim_of
from .layers import ExpoEmbedding, ExpoLinear, ExpoRMSNorm

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
PACKED_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def layer_window(config, index: int) -> int | None:
    """The sliding window of layer `index`, or None for full attention."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return config.sliding_window if layer_types[index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


class ExpoAttentionBlock(nn.Module):
    def __init__(self, config, prefix: str, params: set[str], index: int, rotary: RotaryEmbedding, dtype, device):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = ExpoLinear(config.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv},
                                   bias=f"{prefix}.q_proj.bias" in params, dtype=dtype, device=device)
        self.o_proj = ExpoLinear(q, {"o_proj": config.hidden_size}, bias=f"{prefix}.o_proj.bias" in params, dtype=dtype, device=device)
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
    def __init__(self, config, prefix: str, params: set[str], dtype, device):
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"activation {config.hidden_act!r} is not supported (the Llama family uses silu)")
        inter = config.intermediate_size
        self.gate_up_proj = ExpoLinear(config.hidden_size, {"gate_proj": inter, "up_proj": inter},
                                       bias=f"{prefix}.gate_proj.bias" in params, dtype=dtype, device=device)
        self.down_proj = ExpoLinear(inter, {"down_proj": config.hidden_size}, bias=f"{prefix}.down_proj.bias" in params, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class ExpoDecoderLayer(nn.Module):
    def __init__(self, config, index: int, params: set[str], rotary, dtype, device):
        super().__init__()
        prefix = f"model.layers.{index}"
        eps = config.rms_norm_eps
        self.input_layernorm = ExpoRMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = ExpoAttentionBlock(config, f"{prefix}.self_attn", params, index, rotary, dtype, device)
        self.post_attention_layernorm = ExpoRMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.mlp = ExpoMLP(config, f"{prefix}.mlp", params, dtype, device)

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(positions, self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class ExpoDecoder(nn.Module):
    def __init__(self, config, params: set[str], max_positions: int, dtype, device):
        super().__init__()
        self.embed_tokens = ExpoEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.rotary = RotaryEmbedding(config, max_positions, device)
        self.layers = nn.ModuleList(
            ExpoDecoderLayer(config, i, params, self.rotary, dtype, device) for i in range(config.num_hidden_layers)
        )
        self.norm = ExpoRMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(token_ids)
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)


class ExpoForCausalLM(nn.Module):
    """Forward over a flat batch of token rows; logits only for the rows that need them."""

    def __init__(self, config, params: list[str], tied_lm_head: bool, max_positions: int, dtype, device):
        super().__init__()
        names = set(params)
        self.config = config
        self.model = ExpoDecoder(config, names, max_positions, dtype, device)
        self.tied_lm_head = tied_lm_head
        if not tied_lm_head:
            self.lm_head = ExpoLinear(config.hidden_size, {"lm_head": config.vocab_size}, bias=False, dtype=dtype, device=device)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(token_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 for hidden rows, each at the α the step context gives its row (the
        runner publishes the context of just these rows: StepContext.rows)."""
        logits = self.model.embed_tokens.logits(hidden) if self.tied_lm_head else self.lm_head(hidden)
        return logits.float()

    # -- the α cache's merged weights (engine/alpha_cache.py) -----------------------------------
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
