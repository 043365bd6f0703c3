"""Where expo-serve keeps what it prepares: the demo pair, deltas, the experiments database."""
from __future__ import annotations

import os
from pathlib import Path


def expo_home() -> Path:
    """EXPO_HOME if set, else ~/.cache/expo-serve (created on first use)."""
    root = os.environ.get("EXPO_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "expo-serve")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
