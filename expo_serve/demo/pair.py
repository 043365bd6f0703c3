"""The embedded demo pair: θ_sft is SmolLM2-135M-Instruct, θ_aligned is made here by a short DPO run.

No SFT/aligned pair of a small model can be downloaded on this project's machines (package registries
only, no model hub), so the aligned partner is trained locally, once, on preference pairs the project
ships, and both folders are cached under $EXPO_HOME/demo.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from expo_serve.demo.dpo import DPOConfig
from expo_serve.paths import expo_home

DATA_FILE = Path(__file__).parent / "data" / "preferences.jsonl"
RECIPE_FILE = "expo_dpo.json"  # in the aligned folder: how it was made

# Chosen answers are warm, structured and end by offering more help; rejected ones are curt or
# dismissive. One epoch (12 steps × 8 = all 96 pairs) takes ~3 minutes on 2 CPU cores. lr is high for
# DPO because the run is so short: at 1e-5 the greedy answers barely moved even at α = 1, at 3e-5 the
# aligned model itself began to repeat; at 2e-5 it stays close to θ_sft and α > 0 brings the style out,
# which is the lightly trained regime ExPO is for. β = 0.1 is the usual strength of the reference pull.
RECIPE = DPOConfig(beta=0.1, lr=2e-5, steps=12, batch_size=8, seed=0)

# Held out from the training prompts, to show answers change with α on questions the run never saw.
DEMO_PROMPTS = [
    "How do I make a good cup of tea?",
    "What causes the seasons on Earth?",
    "Can you give me a tip for learning a new language?",
    "What should I pack for a weekend camping trip?",
    "How do I write a birthday message for my grandmother?",
]


@dataclass(frozen=True)
class DemoPair:
    sft_dir: Path
    aligned_dir: Path
    prompts: list[str]


def prepare_demo_pair(home: Path | None = None, log: Callable[[str], None] = print) -> DemoPair:
    """Return the cached demo pair, building what is missing first (a few minutes on 2 CPU cores).

    Each folder is built under a `.partial` name and renamed when complete, so an interrupted run never
    leaves a folder that looks finished; a file lock keeps two processes from building at once."""
    root = Path(home) if home is not None else expo_home()
    demo = root / "demo"
    pair = DemoPair(demo / "sft", demo / "aligned", list(DEMO_PROMPTS))
    if pair.sft_dir.is_dir() and _recipe_matches(pair.aligned_dir):
        return pair

    demo.mkdir(parents=True, exist_ok=True)
    with _exclusive(demo / ".lock", log):
        start = time.perf_counter()
        if not pair.sft_dir.is_dir():
            from expo_serve.demo.smollm import build_sft

            log(f"demo pair [1/2]: θ_sft = SmolLM2-135M-Instruct -> {pair.sft_dir}")
            _build_atomically(pair.sft_dir, lambda out: build_sft(out, log))
            _remove(pair.aligned_dir)  # it was trained from a θ_sft that is gone
        if not _recipe_matches(pair.aligned_dir):
            if pair.aligned_dir.exists():
                log("demo pair: the DPO recipe or data changed since θ_aligned was made; making it again")
                _remove(pair.aligned_dir)
            log(f"demo pair [2/2]: θ_aligned = θ_sft + a short DPO run -> {pair.aligned_dir}")
            _build_atomically(pair.aligned_dir, lambda out: build_aligned(pair.sft_dir, out, log))
        log(f"demo pair ready in {time.perf_counter() - start:.0f}s")
    return pair


def build_aligned(sft_dir: Path, out: Path, log: Callable[[str], None] = print) -> None:
    """Train θ_aligned from the θ_sft folder with RECIPE and write it, with its recipe, to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expo_serve.demo.dpo import encode_pairs, train_dpo
    from expo_serve.demo.smollm import SOURCE_FILE, quiet_transformers, save_checkpoint

    start = time.perf_counter()
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(sft_dir)
        model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    rows = load_preferences()
    log(f"dpo: {len(rows)} preference pairs, β={RECIPE.beta}, lr={RECIPE.lr}, {RECIPE.steps} steps of "
        f"{RECIPE.batch_size} pairs, seed {RECIPE.seed}, {torch.get_num_threads()} threads")
    result = train_dpo(model, encode_pairs(tokenizer, rows), RECIPE, pad_id=tokenizer.pad_token_id, log=log)

    with quiet_transformers():
        save_checkpoint(model, tokenizer, out)
    record = {
        **_recipe(),
        "trained_from": json.loads((sft_dir / SOURCE_FILE).read_text()),
        "pairs": len(rows),
        "final_metrics": result.final(),
        "history": [asdict(m) for m in result.history],
        "train_seconds": round(result.seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_preferences(path: Path = DATA_FILE) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if set(row) != {"prompt", "chosen", "rejected"} or not all(isinstance(v, str) and v for v in row.values()):
            raise ValueError(f"{path}:{n}: expected non-empty strings 'prompt', 'chosen' and 'rejected'")
        rows.append(row)
    return rows


def _recipe() -> dict:
    """What determines θ_aligned: if any of it changes, the cached folder is stale."""
    return {
        "method": "dpo-sigmoid",
        "data_file": DATA_FILE.name,
        "data_sha256": hashlib.sha256(DATA_FILE.read_bytes()).hexdigest(),
        **asdict(RECIPE),
    }


def _recipe_matches(aligned_dir: Path) -> bool:
    try:
        made = json.loads((aligned_dir / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(made.get(k) == v for k, v in _recipe().items())


def _build_atomically(final: Path, build: Callable[[Path], None]) -> None:
    partial = final.with_name(final.name + ".partial")
    _remove(partial)  # left by an interrupted run (we hold the lock, so no one else is writing it)
    try:
        build(partial)
    except BaseException:
        _remove(partial)
        raise
    os.replace(partial, final)


def _remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def _exclusive(lock_path: Path, log: Callable[[str], None]) -> Iterator[None]:
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"demo pair: waiting for another process that is preparing it ({lock_path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
