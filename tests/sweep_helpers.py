"""Shared by the sweep tests: a prompt file and the samples a sweep wrote."""
from __future__ import annotations

import json

PROMPTS = ["Hello world", "The quick brown fox", "Paris is the capital of", "def add(a, b):", "Numbers: 0 1 2"]


def write_prompts(path, prompts=PROMPTS):
    """A prompt file with ids q0, q1, ...; returns its path."""
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"q{i}", "prompt": p}) + "\n")
    return path


def read_samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
