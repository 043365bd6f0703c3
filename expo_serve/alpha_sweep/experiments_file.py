"""DIR/experiments.yaml: α = 0 as control and the best candidates as arms, for `serve --experiments`."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..experiments.config import load_experiments_file
from .stats import AlphaStats

KEY = "alpha-sweep"


def arm_name(alpha: float) -> str:
    return "control" if alpha == 0 else f"alpha-{'m' if alpha < 0 else ''}{abs(alpha):g}"


def write_experiments(path: Path, candidates: list[AlphaStats], judge: str) -> None:
    """Write the file, then read it back through the loader `serve --experiments` uses."""
    arms = [{"name": "control", "alpha": 0.0, "weight": 1, "control": True}]
    arms += [{"name": arm_name(s.alpha), "alpha": s.alpha, "weight": 1} for s in candidates]
    experiment = {
        "key": KEY,
        "description": f"α = 0 against the best {len(candidates)} of an offline sweep judged by {judge}",
        "unit": "user",
        "allocation": "fixed",
        "default": True,
        "primary_metric": "thumbs",
        "arms": arms,
    }
    header = ("# Written by `expo-serve sweep`: start the live A/B with\n"
              "#   expo-serve serve --sft ... --delta ... --experiments experiments.yaml\n"
              "# `default: true` puts every request that names no experiment into it.\n")
    path.write_text(header + yaml.safe_dump([experiment], sort_keys=False, allow_unicode=True), encoding="utf-8")
    load_experiments_file(path)
