"""Load a checkpoint folder's tokenizer without running code from the folder unless told to.

Some checkpoints (InternLM2's) name a tokenizer class of their own in `tokenizer_config.json`
(`auto_map`), written in a Python file beside the weights. transformers would run that file, or,
with no answer given, stop and ask on the terminal. Where the folder also carries a fast tokenizer
(`tokenizer.json`) that file is all a tokenizer needs, and no code runs; otherwise the folder's code
runs only when the user passed --trust-remote-code.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ExpoError

FAST_TOKENIZER_FILE = "tokenizer.json"


def remote_tokenizer_class(folder: Path) -> str | None:
    """The folder's own tokenizer class (`module.Class`) when `tokenizer_config.json` names one."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        auto_map = json.loads(path.read_text()).get("auto_map") or {}
    except json.JSONDecodeError as exc:
        raise ExpoError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    classes = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    if isinstance(classes, (list, tuple)):
        classes = next((c for c in classes if c), None)
    return classes or None


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of a Hugging Face folder: its fast tokenizer file when there is one, the
    folder's own code only with `trust_remote_code` (refused otherwise, with an ExpoError). A folder
    without a tokenizer raises what transformers raises (OSError or ValueError)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    remote = remote_tokenizer_class(folder)
    run_code = remote is not None and not (folder / FAST_TOKENIZER_FILE).is_file()
    if run_code and not trust_remote_code:
        raise ExpoError(
            f"the tokenizer of {folder} is code shipped with the checkpoint ({remote}) and the folder has no "
            f"{FAST_TOKENIZER_FILE}; pass --trust-remote-code to run that code (or trust_remote_code=True in Python), "
            f"or save a fast tokenizer into the folder"
        )
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=run_code)
