"""InternLM2 checkpoints, read as the Llama checkpoints they are under other names.

InternLM2 (`InternLM2ForCausalLM`, remote code that transformers does not contain) is the Llama
block with renamed tensors and one packed attention input, `attention.wqkv`, laid out per
key/value group: for each kv head its G = heads / kv_heads query heads, then its key head, then its
value head, i.e. [kv_heads, G + 2, head_dim, hidden]. `InternLM2Source` presents such a folder as a
Llama checkpoint (a LlamaConfig, Llama names, q/k/v cut out of wqkv) so that Δ building, the engine
and tensor parallelism need nothing of their own, while it still reports its architecture as
InternLM2ForCausalLM; `merge` packs the tensors back (`native_writer`), so a merged InternLM2 is an
InternLM2 checkpoint. The mapping is the one InternLM's convert2llama script applies: renames and a
permutation of rows, so every value is carried over exactly.
"""
from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import torch

from ..errors import ExpoError
from .sources import METADATA_PATTERNS, FolderSource, NativeWriter

ARCHITECTURE = "InternLM2ForCausalLM"
MODEL_TYPE = "internlm2"
ROPE_SCALING_TYPES = ("dynamic", "linear")
# What a delta folder built from an InternLM2 pair stores (recorded in its manifest).
DELTA_LAYOUT = {
    "checkpoint": ARCHITECTURE,
    "tensors": "under Llama names: each attention.wqkv is cut per key/value group into q_proj, k_proj and v_proj "
               "before encoding, and each part is encoded on its own; wo, w1, w3, w2, attention_norm, ffn_norm, "
               "tok_embeddings and output are o_proj, gate_proj, up_proj, down_proj, input_layernorm, "
               "post_attention_layernorm, embed_tokens and lm_head",
    "merge": "packed back into the InternLM2 layout",
}

# Llama module (inside model.layers.N) -> InternLM2 module; q/k/v are the three parts of wqkv.
_LAYER_MODULES = {
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_QKV_PARTS = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
_TOP_MODULES = {"model.embed_tokens": "model.tok_embeddings", "model.norm": "model.norm", "lm_head": "output"}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def native_name(name: str) -> tuple[str, str | None]:
    """(the InternLM2 tensor holding Llama parameter `name`, which part of wqkv it is or None)."""
    match = _LAYER_NAME.match(name)
    if match:
        index, module, kind = match.groups()
        if module in _QKV_PARTS:
            return f"model.layers.{index}.attention.wqkv.{kind}", _QKV_PARTS[module]
        return f"model.layers.{index}.{_LAYER_MODULES[module]}.{kind}", None
    module, kind = name.rsplit(".", 1)
    return f"{_TOP_MODULES[module]}.{kind}", None


def is_internlm2(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE or ARCHITECTURE in (config.get("architectures") or [])


def llama_config(native: dict, where: str):
    """The LlamaConfig of an InternLM2 config.json (as convert2llama writes it), or one sentence on
    what is wrong with it."""
    from transformers import LlamaConfig

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(native.get(key), int) or native[key] <= 0:
            raise ExpoError(f"{where}: the InternLM2 config has no valid {key} (a positive integer)")
    heads, hidden = native["num_attention_heads"], native["hidden_size"]
    kv_heads = native.get("num_key_value_heads") or heads
    if hidden % heads or heads % kv_heads:
        raise ExpoError(f"{where}: {heads} attention heads do not divide a hidden size of {hidden} into "
                        f"groups over {kv_heads} key/value heads")
    return LlamaConfig(
        vocab_size=native["vocab_size"],
        hidden_size=hidden,
        intermediate_size=native["intermediate_size"],
        num_hidden_layers=native["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act=native.get("hidden_act", "silu"),
        max_position_embeddings=native.get("max_position_embeddings", 2048),
        rms_norm_eps=native.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=native.get("tie_word_embeddings", False),
        attention_bias=bool(native.get("bias", True)),  # InternLM2's `bias` is wqkv's and wo's
        mlp_bias=False,
        rope_parameters=_rope_parameters(native, where),
        bos_token_id=native.get("bos_token_id"),
        eos_token_id=native.get("eos_token_id"),
        pad_token_id=native.get("pad_token_id"),
        architectures=[ARCHITECTURE],
    )


def _rope_parameters(native: dict, where: str) -> dict:
    theta = float(native.get("rope_theta", 10000.0))
    scaling = native.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_TYPES:
        raise ExpoError(f"{where}: rope_scaling {scaling!r} is not a type expo-serve implements for InternLM2 "
                        f"(it reads {' and '.join(ROPE_SCALING_TYPES)})")
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ExpoError(f"{where}: rope_scaling needs a factor of at least 1, not {factor!r}")
    return {"rope_type": kind, "factor": float(factor), "rope_theta": theta}


def _head_dim(config) -> int:
    return config.hidden_size // config.num_attention_heads


def unpack_qkv(wqkv: torch.Tensor, config) -> dict[str, torch.Tensor]:
    """q, k and v rows of a packed wqkv weight [rows, hidden] or bias [rows], each contiguous."""
    kv_heads, dim = config.num_key_value_heads, _head_dim(config)
    group = config.num_attention_heads // kv_heads
    rest = tuple(wqkv.shape[1:])
    grouped = wqkv.reshape(kv_heads, group + 2, dim, *rest)
    return {"q": grouped[:, :group].reshape(-1, *rest), "k": grouped[:, group].reshape(-1, *rest),
            "v": grouped[:, group + 1].reshape(-1, *rest)}


def pack_qkv(parts: dict[str, torch.Tensor], config) -> torch.Tensor:
    """The inverse of unpack_qkv."""
    kv_heads, dim = config.num_key_value_heads, _head_dim(config)
    rest = tuple(parts["q"].shape[1:])
    grouped = [parts[p].reshape(kv_heads, -1, dim, *rest) for p in "qkv"]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


class InternLM2Source(FolderSource):
    """An InternLM2 folder, read as Llama (see the module's docstring)."""

    metadata_patterns = (*METADATA_PATTERNS, "*.py")  # the remote code travels with config and tokenizer
    delta_layout = DELTA_LAYOUT

    def __init__(self, folder, spec: str | None = None, *, trust_remote_code: bool = False):
        super().__init__(folder, spec, trust_remote_code=trust_remote_code)
        self.native_config = _read_config(self.folder)
        self._check_packed_shapes()

    @cached_property
    def config(self):
        return llama_config(self.native_config, self.spec)

    @cached_property
    def _names(self) -> dict[str, tuple[str, str | None]]:
        """Every Llama name (tied aliases too) whose tensor the folder stores -> native_name()."""
        stored = set(self._files)
        names = {}
        for name in (*self.parameter_names, *self.tied):
            native, part = native_name(name)
            if native in stored:
                names[name] = (native, part)
        return names

    def _check_packed_shapes(self) -> None:
        """A wqkv that does not hold the config's heads is refused here, in one sentence, not as a
        shape error deep inside the model."""
        config = self.config
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
        rows = (heads + 2 * kv_heads) * dim
        for layer in range(config.num_hidden_layers):
            for kind, expected in (("weight", (rows, config.hidden_size)), ("bias", (rows,))):
                native = f"model.layers.{layer}.attention.wqkv.{kind}"
                if native in self._files and tuple(self._files[native].shape(native)) != expected:
                    raise ExpoError(
                        f"{self.spec}: {native} is {list(self._files[native].shape(native))}, but {heads} query and "
                        f"{kv_heads} key/value heads of {dim} dimensions over a hidden size of {config.hidden_size} "
                        f"make {list(expected)}: the weights do not match config.json")

    def _stored_names(self) -> set[str]:
        return set(self._names)

    def _read(self, stored_name: str) -> torch.Tensor:
        native, part = self._names[stored_name]
        tensor = self._files[native].get(native)
        return tensor if part is None else unpack_qkv(tensor, self.config)[part]

    def _stored_shape(self, stored_name: str) -> tuple[int, ...]:
        native, part = self._names[stored_name]
        shape = tuple(self._files[native].shape(native))
        if part is None:
            return shape
        heads = self.config.num_attention_heads if part == "q" else self.config.num_key_value_heads
        return (heads * _head_dim(self.config), *shape[1:])

    def get_slice(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        native, part = self._names[self._resolve(name)]
        if part is not None:  # the rows of a part are spread over wqkv: cut the part, then slice it
            tensor = self.get(name)
            return tensor if dim is None else tensor.narrow(dim, start, stop - start).clone()
        return self._files[native].get_slice(native, dim, start, stop)

    def sample(self, name: str, index: torch.Tensor) -> torch.Tensor:
        native, part = self._names[self._resolve(name)]
        if part is not None:
            return self.get(name).reshape(-1)[index]
        return self._files[native].sample(native, index)

    def native_writer(self) -> NativeWriter:
        return _PackingWriter(self.config)


class _PackingWriter(NativeWriter):
    """Llama-named tensors in, InternLM2 tensors out: q, k and v wait for each other, then go out
    as one wqkv."""

    def __init__(self, config):
        self.config = config
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        native, part = native_name(name)
        if part is None:
            return [(native, tensor)]
        parts = self.pending.setdefault(native, {})
        parts[part] = tensor
        if len(parts) < 3:
            return []
        del self.pending[native]
        return [(native, pack_qkv(parts, self.config))]

    def close(self) -> None:
        if self.pending:
            name = next(iter(self.pending))
            raise ExpoError(f"{name} cannot be written: only {sorted(self.pending[name])} of q, k and v were given")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExpoError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def is_internlm2_folder(folder: Path) -> bool:
    path = Path(folder) / "config.json"
    return path.is_file() and is_internlm2(_read_config(Path(folder)))
