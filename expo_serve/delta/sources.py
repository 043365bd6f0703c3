"""Where model weights come from: a local Hugging Face folder, a .gguf file, or a hub id.

A `ModelSource` gives the parameters of a causal LM by name, one tensor at a time, in the
dtype they are stored in, plus the config and tokenizer. Parameter names, tied groups and the
parameter/buffer split come from the model class itself (instantiated on the meta device, which
costs no memory), so a buffer saved in a checkpoint (`rotary_emb.inv_freq`) is never taken for
a parameter and a tied lm_head is listed once.
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path

import torch

from ..errors import ExpoError
from .safetensors_io import SafetensorsReader
from .tokenizer import load_tokenizer

# Files a checkpoint folder carries besides its weights: config, generation defaults, tokenizer.
METADATA_PATTERNS = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken")
_WEIGHT_INDEX = "model.safetensors.index.json"


class NativeWriter:
    """Turns a model's tensors, by canonical name, into the tensors its checkpoint stores (for a
    layout read under other names, such as InternLM2's, the way back). Here: as they are."""

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(name, tensor)]

    def close(self) -> None:
        """Called after the last tensor."""


class ModelSource(ABC):
    """The parameters of one causal LM, readable tensor by tensor."""

    # How a delta built from this source stores its tensors, when not under the checkpoint's own
    # names (recorded in the manifest).
    delta_layout: dict | None = None

    def __init__(self, spec: str):
        self.spec = spec

    # -- what a concrete source provides ----------------------------------------------------
    @property
    @abstractmethod
    def config(self):
        """The transformers PretrainedConfig."""

    @abstractmethod
    def _stored_names(self) -> set[str]:
        """Names of every tensor the source stores (parameters and perhaps buffers)."""

    @abstractmethod
    def _read(self, stored_name: str) -> torch.Tensor:
        ...

    @abstractmethod
    def _stored_shape(self, stored_name: str) -> tuple[int, ...]:
        ...

    @abstractmethod
    def load_tokenizer(self):
        ...

    @abstractmethod
    def save_metadata(self, folder: Path) -> None:
        """Write config.json, generation_config.json and the tokenizer files into `folder`."""

    # -- shared behaviour -------------------------------------------------------------------
    @cached_property
    def _layout(self) -> tuple[str, list[str], dict[str, str]]:
        """(architecture, canonical parameter names in model order, {tied alias: canonical})."""
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self.config)
        except (ValueError, KeyError) as exc:
            raise ExpoError(f"{self.spec}: transformers cannot build a causal LM from its config ({exc})") from exc
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        names = [group[0] for group in groups.values()]
        tied = {alias: group[0] for group in groups.values() for alias in group[1:]}
        architecture = (getattr(self.config, "architectures", None) or [type(model).__name__])[0]
        return architecture, names, tied

    @property
    def architecture(self) -> str:
        return self._layout[0]

    @property
    def parameter_names(self) -> list[str]:
        """Every parameter once (a tied lm_head appears under the embedding's name)."""
        return self._layout[1]

    @property
    def tied(self) -> dict[str, str]:
        return self._layout[2]

    def _resolve(self, name: str) -> str:
        """The stored name of a parameter: a tied one may be stored under any of its names."""
        stored = self._stored_names()
        if name in stored:
            return name
        for alias, canonical in self.tied.items():
            if canonical == name and alias in stored:
                return alias
        raise ExpoError(f"{self.spec} has no tensor {name}: the checkpoint is incomplete")

    def get(self, name: str) -> torch.Tensor:
        """A parameter in the dtype it is stored in."""
        return self._read(self._resolve(name))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._stored_shape(self._resolve(name)))

    def get_slice(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of a parameter (dim None: all of it).
        A folder reads only the slice; other sources hold the tensor in memory anyway."""
        tensor = self.get(name)
        return tensor if dim is None else tensor.narrow(dim, start, stop - start).clone()

    def sample(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """The values at flat positions `index` of a parameter."""
        return self.get(name).reshape(-1)[index]

    def native_writer(self) -> NativeWriter:
        """What `merge` writes its tensors through, to give back this checkpoint's layout."""
        return NativeWriter()

    def check_complete(self) -> None:
        """Fail early, naming the first parameter the checkpoint lacks."""
        for name in self.parameter_names:
            self._resolve(name)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)


class FolderSource(ModelSource):
    """A local Hugging Face folder: config.json plus safetensors, single or sharded. Its tokenizer
    runs code from the folder only with `trust_remote_code` (delta/tokenizer.py)."""

    metadata_patterns = METADATA_PATTERNS

    def __init__(self, folder: str | os.PathLike, spec: str | None = None, *, trust_remote_code: bool = False):
        super().__init__(spec or str(folder))
        self.folder = Path(folder)
        self.trust_remote_code = trust_remote_code
        if not (self.folder / "config.json").is_file():
            raise ExpoError(f"{self.folder} is not a Hugging Face model folder: it has no config.json")
        self._files = self._weight_files()

    def _weight_files(self) -> dict[str, SafetensorsReader]:
        index = self.folder / _WEIGHT_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ExpoError(f"{index} is not a valid safetensors index (no weight_map)") from exc
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise ExpoError(f"{self.folder} is missing the shard {missing[0]} named in {_WEIGHT_INDEX}")
            paths = [self.folder / n for n in names]
        else:
            paths = sorted(self.folder.glob("*.safetensors"))
        if not paths:
            if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
                raise ExpoError(f"{self.folder} holds only pickled weights (.bin/.pt), which expo-serve never loads; convert them to safetensors first")
            raise ExpoError(f"{self.folder} has no .safetensors weights")
        files = {}
        for path in paths:
            reader = SafetensorsReader(path)
            for key in reader.keys():
                files[key] = reader
        return files

    @cached_property
    def config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.folder)
        except (ValueError, OSError, json.JSONDecodeError) as exc:
            raise ExpoError(f"{self.folder}/config.json cannot be read by transformers: {exc}") from exc

    def _stored_names(self) -> set[str]:
        return set(self._files)

    def _read(self, stored_name: str) -> torch.Tensor:
        return self._files[stored_name].get(stored_name)

    def _stored_shape(self, stored_name: str) -> tuple[int, ...]:
        return self._files[stored_name].shape(stored_name)

    def get_slice(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        stored = self._resolve(name)
        return self._files[stored].get_slice(stored, dim, start, stop)

    def sample(self, name: str, index: torch.Tensor) -> torch.Tensor:
        stored = self._resolve(name)
        return self._files[stored].sample(stored, index)

    def load_tokenizer(self):
        return load_tokenizer(self.folder, trust_remote_code=self.trust_remote_code)

    def save_metadata(self, folder: Path) -> None:
        import shutil

        for pattern in self.metadata_patterns:
            for path in self.folder.glob(pattern):
                if path.name != _WEIGHT_INDEX:
                    shutil.copy2(path, folder / path.name)


class GGUFSource(ModelSource):
    """A .gguf file, dequantized by transformers into float32 on load (held in memory)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(str(path))
        self.path = Path(path)
        if not self.path.is_file():
            raise ExpoError(f"{self.path} does not exist")

    @cached_property
    def _model(self):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(self.path.parent, gguf_file=self.path.name, dtype=torch.float32)
        except (ValueError, OSError, ImportError) as exc:
            raise ExpoError(f"transformers cannot load {self.path} as a GGUF model: {exc}") from exc
        # The config remembers the GGUF it came from; a checkpoint written from it must not.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model

    @property
    def config(self):
        return self._model.config

    @cached_property
    def _state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self._model.named_parameters()}

    def _stored_names(self) -> set[str]:
        return set(self._state)

    def _read(self, stored_name: str) -> torch.Tensor:
        return self._state[stored_name]

    def _stored_shape(self, stored_name: str) -> tuple[int, ...]:
        return tuple(self._state[stored_name].shape)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)

    def generation_config_dict(self) -> dict:
        config = self._model.generation_config
        return config.to_dict() if config is not None else {}

    def save_metadata(self, folder: Path) -> None:
        self.config.save_pretrained(folder)
        if self._model.generation_config is not None:
            self._model.generation_config.save_pretrained(folder)
        self.load_tokenizer().save_pretrained(folder)


def open_source(spec: "str | os.PathLike | ModelSource", *, trust_remote_code: bool = False) -> ModelSource:
    """A model from a local folder, a .gguf file, or (network permitting) a hub id; a source
    already opened (an in-memory model, say) is taken as it is. `trust_remote_code` lets a folder's
    tokenizer run the code it ships with, where it has no fast tokenizer file."""
    if isinstance(spec, ModelSource):
        return spec
    path = Path(spec)
    if path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        return _folder_source(path, str(spec), trust_remote_code)
    if path.exists():
        raise ExpoError(f"{spec} is neither a model folder nor a .gguf file")
    return _folder_source(_download_from_hub(str(spec)), str(spec), trust_remote_code)


def _folder_source(folder: Path, spec: str, trust_remote_code: bool) -> FolderSource:
    """A folder in Hugging Face's layout, or in InternLM2's (read as Llama: delta/internlm2.py)."""
    from .internlm2 import InternLM2Source, is_internlm2_folder

    source = InternLM2Source if is_internlm2_folder(folder) else FolderSource
    return source(folder, spec, trust_remote_code=trust_remote_code)


def _download_from_hub(repo_id: str) -> Path:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise ExpoError(f"{repo_id} does not exist: give a model folder, a .gguf file or a hub id like org/name")
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", _WEIGHT_INDEX, *METADATA_PATTERNS, "*.py"]  # remote code is copied, never run
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types for "offline" and "not found"
        raise ExpoError(
            f"cannot fetch {repo_id} from the Hugging Face hub ({type(exc).__name__}); where the network allows, "
            f"run `hf download {repo_id} --local-dir DIR` and pass DIR instead"
        ) from exc
