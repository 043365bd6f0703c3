"""Tiny random SFT/aligned pairs of real Hugging Face architectures, saved as HF folders.

The aligned model is the SFT model plus a seeded perturbation of every parameter (embeddings,
norms, lm_head, biases) except one norm weight, which stays unchanged so that the `zero`
encoding is exercised. The tokenizer is a real byte-level BPE trained here on a small corpus,
with a ChatML template, so chat formatting, multi-token stop strings and detokenization are real.
"""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "ExPO extrapolates from the SFT model through the aligned model.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France. Rome is the capital of Italy.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 320
UNCHANGED = "model.layers.0.post_attention_layernorm.weight"


def make_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=VOCAB_SIZE - 16, min_frequency=2, special_tokens=SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_config(arch: str, *, tie: bool = False, sliding_window: int | None = None, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        initializer_range=0.2,  # peaked logits: greedy choices are far from ties
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**common, rope_parameters=rope)
    if arch == "llama-linear":
        return LlamaConfig(**common, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    if arch == "llama-dynamic":
        # Dynamic NTK changes the rotation only past max_position_embeddings: 16, so short prompts
        # cross it; the context window is 16 × 4.
        rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
        return LlamaConfig(**{**common, "max_position_embeddings": 16}, rope_parameters=rope)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=sliding_window)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(arch)


def make_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    # Random-init norms are all ones and biases zeros; give them values so their Δ means something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def perturb(model, seed: int, scale: float = 0.05, unchanged: str = UNCHANGED):
    """A stand-in for alignment: every parameter but `unchanged` moves by a seeded random step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != unchanged:
                p.add_(torch.randn(p.shape, generator=generator) * scale * (p.abs().mean() + 1e-3))
    return model


def save_pair(root: Path, arch: str = "llama", *, tie: bool = False, sliding_window: int | None = None,
              seed: int = 0, shard_size: str | None = None, layers: int = 2, hidden: int = 64,
              delta_scale: float = 0.05) -> tuple[Path, Path]:
    """Write `root/sft` and `root/aligned` as HF folders and return their paths."""
    config = make_config(arch, tie=tie, sliding_window=sliding_window, layers=layers, hidden=hidden)
    tokenizer = make_tokenizer()
    model = make_model(config, seed)
    sft = _save(model, tokenizer, root / "sft", shard_size)
    aligned = _save(perturb(model, seed + 1, scale=delta_scale), tokenizer, root / "aligned", shard_size)
    return sft, aligned


def _save(model, tokenizer, folder: Path, shard_size: str | None) -> Path:
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    return folder


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every parameter of a saved model, through transformers (the independent reader)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {name: p.detach().clone() for name, p in model.named_parameters()}
