"""`expo-serve sweep` and `expo_serve.sweep(...)`: choose α by generating every α of a grid in one batched run and judging the answers.

grid (the α list), prompts (the prompt file), generate (one engine run), judges (implicit,
reward-model, openai), stats (bootstrap, win rates), report (results files and plot),
experiments_file (the ready A/B), run (the whole command).
"""
from .run import SweepResult, sweep

__all__ = ["SweepResult", "sweep"]
