"""Tiny random InternLM2 pairs, made from tiny Llama pairs by the inverse of InternLM's published
InternLM2 → Llama conversion (convert2llama.py), and that conversion itself, written here from the
published layout, independently of expo-serve's reader.

wqkv holds, for each key/value head h, its q heads, then k_h, then v_h:
rearrange(wqkv, "(h gs d) dim -> h gs d dim", gs=2 + q_per_kv, d=head_dim), split [q_per_kv, 1, 1].
The Llama pair stays on disk beside the InternLM2 pair: it is what the reference runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from factories import make_model, make_tokenizer, perturb
from safetensors.torch import load_file, save_file

REMOTE_CODE = ("configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
               "tokenization_internlm2_fast.py")
RENAMES = [  # Llama suffix -> InternLM2 suffix, inside model.layers.N
    ("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
    ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
    ("post_attention_layernorm", "ffn_norm"),
]


def llama_config(*, bias: bool, rope: dict | None = None, max_positions: int = 256):
    """4 query heads per key/value head (8 over 2), head_dim 8."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_positions,
                       initializer_range=0.2, attention_bias=bias, mlp_bias=False, tie_word_embeddings=False,
                       rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _renamed(config) -> list[tuple[str, str]]:
    """(Llama name, InternLM2 name) of every tensor but q/k/v and wqkv."""
    pairs = [("model.embed_tokens.weight", "model.tok_embeddings.weight"), ("model.norm.weight", "model.norm.weight"),
             ("lm_head.weight", "output.weight")]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        pairs += [(f"{p}{llama}.{kind}", f"{p}{intern}.{kind}") for llama, intern in RENAMES for kind in ("weight", "bias")]
    return pairs


def _groups(config) -> tuple[int, int, int]:
    """(key/value heads, query heads per key/value head, head dim)."""
    kv = config.num_key_value_heads
    return kv, config.num_attention_heads // kv, config.hidden_size // config.num_attention_heads


def to_internlm2(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Llama names and separate q/k/v -> InternLM2 names and one grouped wqkv."""
    kv, group, d = _groups(config)
    out = {intern: state[llama] for llama, intern in _renamed(config) if llama in state}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if p + f"self_attn.q_proj.{kind}" not in state:
                continue
            q, k, v = (state[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv")
            rest = q.shape[1:]
            packed = torch.cat([q.reshape(kv, group, d, *rest), k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)], 1)
            out[p + f"attention.wqkv.{kind}"] = packed.reshape(-1, *rest).contiguous()
    return out


def to_llama(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The published conversion, InternLM2 -> Llama."""
    kv, group, d = _groups(config)
    out = {llama: state[intern] for llama, intern in _renamed(config) if intern in state}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if p + f"attention.wqkv.{kind}" not in state:
                continue
            wqkv = state[p + f"attention.wqkv.{kind}"]
            rest = wqkv.shape[1:]
            q, k, v = torch.split(wqkv.reshape(kv, group + 2, d, *rest), [group, 1, 1], dim=1)
            for name, part in zip("qkv", (q, k, v)):
                out[p + f"self_attn.{name}_proj.{kind}"] = part.reshape(-1, *rest).contiguous()
    return out


def native_config(config, rope_scaling: dict | None) -> dict:
    """config.json as InternLM2 checkpoints write it (their remote code's InternLM2Config)."""
    theta = config.rope_parameters["rope_theta"]
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2", "attn_implementation": "eager", "bias": config.attention_bias,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": theta, "rope_scaling": rope_scaling, "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": True,
    }


def save_internlm2(folder: Path, state: dict[str, torch.Tensor], config, rope_scaling: dict | None, tokenizer,
                   *, fast_tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True)
    save_file(to_internlm2(state, config), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(native_config(config, rope_scaling), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2]}))
    tokenizer.save_pretrained(folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "InternLM2Tokenizer"
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                                "tokenization_internlm2_fast.InternLM2TokenizerFast"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    for name in REMOTE_CODE:
        (folder / name).write_text(f"# {name}: stands in for InternLM2's remote code; the tests check that it is copied, "
                                   "never that it runs\n")
    if not fast_tokenizer:
        # What the folder's own code would read instead; the config and tokenizer files become code that
        # transformers runs with trust_remote_code (the tokenizer reads the renamed file).
        (folder / "tokenizer.json").rename(folder / "stand_in_tokenizer.json")
        (folder / "configuration_internlm2.py").write_text(
            "from transformers import PretrainedConfig\n\n\n"
            "class InternLM2Config(PretrainedConfig):\n"
            "    model_type = 'internlm2'\n")
        for module, name in (("tokenization_internlm2", "InternLM2Tokenizer"),
                             ("tokenization_internlm2_fast", "InternLM2TokenizerFast")):
            (folder / f"{module}.py").write_text(
                "from transformers import PreTrainedTokenizerFast\n\n\n"
                f"class {name}(PreTrainedTokenizerFast):\n"
                "    vocab_files_names = {'vocab_file': 'stand_in_tokenizer.json'}\n\n"
                "    def __init__(self, vocab_file=None, **kwargs):\n"
                "        super().__init__(tokenizer_file=vocab_file, **kwargs)\n")
    return folder


def save_pair(root: Path, *, bias: bool = False, rope_scaling: dict | None = None, max_positions: int = 256,
              seed: int = 0, fast_tokenizer: bool = True) -> dict[str, Path]:
    """`root/llama-sft`, `root/llama-aligned` (HF Llama folders, the reference) and
    `root/sft`, `root/aligned` (the same weights as InternLM2 folders)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {"rope_type": rope_scaling["type"], "factor": rope_scaling["factor"], "rope_theta": 10000.0}
    config = llama_config(bias=bias, rope=rope, max_positions=max_positions)
    tokenizer = make_tokenizer()
    model = make_model(config, seed)
    paths = {}
    for role in ("sft", "aligned"):
        if role == "aligned":
            perturb(model, seed + 1)
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.save_pretrained(root / f"llama-{role}")
        tokenizer.save_pretrained(root / f"llama-{role}")
        paths[f"llama-{role}"] = root / f"llama-{role}"
        paths[role] = save_internlm2(root / role, state, config, rope_scaling, tokenizer, fast_tokenizer=fast_tokenizer)
    return paths


def read_as_llama(folder: Path, config) -> dict[str, torch.Tensor]:
    """Every tensor of an InternLM2 folder, converted to Llama names."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return to_llama(state, config)
