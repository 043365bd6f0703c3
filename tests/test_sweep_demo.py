"""The README's demo sweep, run as printed there, on the real demo pair. Slow: it prepares the pair on
first use (minutes, then cached) and generates 32 prompts × 5 α."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_sweep() -> tuple[list[str], str]:
    """The README's `expo-serve sweep` command (backslash lines joined) and the output pasted after it."""
    text = README.read_text()
    start = text.index("expo-serve sweep --sft ~/.cache/expo-serve/demo/sft")
    command = text[start: text.index("\n```", start)].replace("\\\n", " ")
    printed_start = text.index("```text\n", start) + len("```text\n")
    return shlex.split(command), text[printed_start: text.index("\n```", printed_start)]


def test_readme_demo_sweep_runs_as_printed(tmp_path):
    from expo_serve.demo.pair import prepare_demo_pair
    from expo_serve.paths import expo_home

    prepare_demo_pair()  # what `expo-serve demo --no-serve`, the README's step before, does
    args, printed = readme_sweep()
    assert args[:2] == ["expo-serve", "sweep"]
    home = str(expo_home())
    args = [a.replace("~/.cache/expo-serve", home) for a in args[2:]]
    out = tmp_path / "sweep-demo"
    args[args.index("--out") + 1] = str(out)
    done = subprocess.run([sys.executable, "-m", "expo_serve", "sweep", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]

    def table(text):
        return [line.split() for line in text.splitlines() if re.match(r"^\s+-?\d", line)]

    ours, theirs = table(done.stdout), table(printed)
    assert [row[0] for row in ours] == [row[0] for row in theirs]  # the same α grid
    for mine, readme in zip(ours, theirs):  # mean length: the last column (a trailing * marks the pick)
        length = [x for x in mine if x != "*"][-1], [x for x in readme if x != "*"][-1]
        assert float(length[0]) == pytest.approx(float(length[1]), rel=0.1), (mine, readme)
        assert float(mine[1]) == pytest.approx(float(readme[1]), rel=0.05), (mine, readme)  # mean score
    recommended = re.search(r"recommended α = (\S+):", done.stdout).group(1)
    assert recommended == re.search(r"recommended α = (\S+):", printed).group(1)
    results = json.loads((out / "results.json").read_text())
    assert results["prompts"] == 32 and len(results["per_alpha"]) == len(ours)
    assert sorted(p.name for p in out.iterdir()) == ["experiments.yaml", "report.md", "results.csv", "results.json",
                                                     "samples.jsonl", "sweep.png"]
