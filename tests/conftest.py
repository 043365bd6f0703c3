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
