import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from factories import save_pair  # noqa: E402


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """Tiny random pairs by name, made once per session: {name: (sft_dir, aligned_dir)}."""
    made = {}

    def get(name: str, **kwargs):
        if name not in made:
            arch = kwargs.pop("arch", name.split("-")[0])
            made[name] = save_pair(tmp_path_factory.mktemp(name), arch, **kwargs)
        return made[name]

    return get


@pytest.fixture(scope="module")
def engine(pairs):
    """A running AsyncEngine on the tiny Qwen2 pair, for the app tests that run in process."""
    from expo_serve.engine.async_engine import AsyncEngine
    from expo_serve.engine.llm_engine import EngineConfig, LLMEngine

    sft, aligned = pairs("qwen2")
    engine = AsyncEngine(LLMEngine(EngineConfig(sft=str(sft), aligned=str(aligned), max_model_len=128,
                                                kv_cache_bytes=2**24)))
    yield engine
    engine.shutdown()
