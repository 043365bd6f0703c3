"""A random SFT/aligned pair of a real shape, made where it runs (never downloaded).

`RandomSource` is a ModelSource whose tensors are drawn on demand, on the target device, from a
seed per parameter name: the SFT model from one seed, the aligned model as the SFT plus a small
seeded step (the stand-in for alignment). The same name and seed always give the same tensor,
so a source can be read twice (a delta build, then a server loading the saved SFT) and agree
with itself bit for bit. Timing does not depend on the values, only on the shapes and dtypes.

Shapes: `mistral-7b` (Mistral-7B-v0.2: 32 layers, hidden 4096, intermediate 14336, 32 heads,
8 kv heads, vocab 32000) for the GPU, `tiny` (2 layers, hidden 64) for the dry run on a CPU.

The tokenizer is a word-level one whose vocabulary is the shipped demo texts' words, padded
with placeholder words to the model's vocabulary, with a ChatML template: prompts built from
English text tokenize to real ids, and any generated id decodes to some text.
"""
from __future__ import annotations

import json
import zlib
from functools import cached_property
from pathlib import Path

import torch

from expo_serve.delta.sources import ModelSource

SHAPES = {
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
SPECIAL_TOKENS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_config(shape: str, max_position_embeddings: int = 32768):
    from transformers import MistralConfig

    return MistralConfig(**SHAPES[shape], max_position_embeddings=max_position_embeddings, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                         bos_token_id=2, eos_token_id=3, pad_token_id=1, architectures=["MistralForCausalLM"])


def make_tokenizer(vocab_size: int):
    """Word-level: the demo texts' words (most frequent first), then placeholders `w<i>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from expo_serve.demo.pair import load_preferences

    split = pre_tokenizers.Whitespace()
    counts: dict[str, int] = {}
    for row in load_preferences():
        for key in ("prompt", "chosen", "rejected"):
            for word, _ in split.pre_tokenize_str(row.get(key, "")):
                counts[word] = counts.get(word, 0) + 1
    roles = ["system", "user", "assistant"]
    words = roles + sorted((w for w in counts if w not in roles), key=lambda w: (-counts[w], w))
    words = words[: vocab_size - len(SPECIAL_TOKENS)]
    words += [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS) - len(words))]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = split
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no space before punctuation
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class RandomSource(ModelSource):
    """A causal LM whose every parameter is drawn from (seed, name) on `device`, in `dtype`.

    With `base`, the model is that base plus a seeded step of relative size `step` in every
    parameter: an aligned partner whose Δ has the spread of a light fine-tune."""

    def __init__(self, config, *, seed: int, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                 base: "RandomSource | None" = None, step: float = 0.05, tokenizer=None, spec: str | None = None):
        super().__init__(spec or f"random:{config.model_type}-{config.num_hidden_layers}L-seed{seed}")
        self._config = config
        self.seed = seed
        self.device = torch.device(device)
        self.dtype = dtype
        self.base = base
        self.step = step
        self._tokenizer = tokenizer or (base.load_tokenizer() if base else make_tokenizer(config.vocab_size))

    @property
    def config(self):
        return self._config

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self._config)
        return {name: tuple(p.shape) for name, p in model.named_parameters()}

    def _stored_names(self) -> set[str]:
        return set(self._shapes)

    def _stored_shape(self, stored_name: str) -> tuple[int, ...]:
        return self._shapes[stored_name]

    def _noise(self, name: str, salt: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + salt + zlib.crc32(name.encode()))
        return torch.randn(self._shapes[name], generator=generator, device=self.device, dtype=torch.float32)

    def _read(self, stored_name: str) -> torch.Tensor:
        if self.base is not None:
            base = self.base._read(stored_name).to(torch.float32)
            step = self._noise(stored_name, 1) * (self.step * base.abs().mean())
            return (base + step).to(self.dtype)
        noise = self._noise(stored_name, 0)
        if noise.dim() == 1:  # norm weights: around one, as trained models have them
            return (1.0 + 0.1 * noise).to(self.dtype)
        return (noise * 0.02).to(self.dtype)

    def load_tokenizer(self):
        return self._tokenizer

    def generation_config_dict(self) -> dict:
        return {"bos_token_id": self._config.bos_token_id, "eos_token_id": self._config.eos_token_id}

    def save_metadata(self, folder: Path) -> None:
        config = self._config.to_dict()
        config["dtype"] = str(self.dtype).removeprefix("torch.")
        (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (Path(folder) / "generation_config.json").write_text(json.dumps(self.generation_config_dict(), indent=2))
        self._tokenizer.save_pretrained(folder)

    @property
    def weight_bytes(self) -> int:
        return sum(torch.Size(s).numel() for s in self._shapes.values()) * torch.empty(0, dtype=self.dtype).element_size()


def save_folder(source: RandomSource, folder: Path, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write `source` as a Hugging Face model folder (safetensors shards, config, tokenizer)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    element = torch.empty(0, dtype=source.dtype).element_size()
    shards: list[list[str]] = [[]]  # planned from the shapes, so each shard is written as soon as it is drawn
    size = 0
    for name in source.parameter_names:
        nbytes = torch.Size(source.shape(name)).numel() * element
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: source.get(name).cpu() for name in names}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
    if len(shards) > 1:
        index = {"metadata": {"total_size": source.weight_bytes}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    source.save_metadata(folder)
    return folder


def make_pair(shape: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[RandomSource, RandomSource]:
    config = make_config(shape)
    sft = RandomSource(config, seed=seed, device=device, dtype=dtype)
    aligned = RandomSource(config, seed=seed + 1, device=device, dtype=dtype, base=sft)
    return sft, aligned
