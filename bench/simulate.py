"""A simulated population with a true, α-dependent preference, for demos (live_run.py,
live_ab_demo.py), the dashboard screenshot and the tests. The ground truth lives here, so results can be checked against it.

Each user has a personal taste (a logit offset); the chance of a thumbs-up peaks at α = 0.4
(0.55 at α = 0, 0.80 at α = 0.4, 0.40 from α = 1.5 on, before taste),
answers lengthen with α (as ExPO's do), and latency follows length.
"""
from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass
from typing import Any, Callable


def thumbs_up_probability(alpha: float, taste: float = 0.0) -> float:
    base = 0.40 + 0.40 * math.exp(-((alpha - 0.4) / 0.4) ** 2)
    logit = math.log(base / (1 - base)) + taste
    return 1 / (1 + math.exp(-logit))


def population_mean(alpha: float, taste_sd: float, draws: int = 20_000, seed: int = 0) -> float:
    """The thumbs-up rate over the whole population at α (what the results should estimate)."""
    rng = random.Random(seed)
    return sum(thumbs_up_probability(alpha, rng.gauss(0, taste_sd)) for _ in range(draws)) / draws


@dataclass
class Population:
    users: int = 400
    taste_sd: float = 0.5
    feedback_rate: float = 0.8      # share of answers that get a vote
    abort_rate: float = 0.02
    seed: int = 0

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.taste = [self.rng.gauss(0, self.taste_sd) for _ in range(self.users)]

    def request_rng(self, i: int) -> random.Random:
        """The randomness of request i alone, so concurrent runs give the same data in any order."""
        return random.Random(f"{self.seed}:{i}")

    def visitor(self, rng: random.Random) -> int:
        return rng.randrange(self.users)

    def answer(self, alpha: float, rng: random.Random) -> dict:
        tokens = max(1, int(rng.gauss(120 * (1 + 0.4 * alpha), 20)))
        aborted = rng.random() < self.abort_rate
        latency = 0.2 + 0.012 * tokens * rng.uniform(0.9, 1.1)
        return {"latency_s": latency, "ttft_s": rng.uniform(0.05, 0.15), "output_tokens": tokens,
                "finish_reason": "length" if tokens > 200 else "stop", "aborted": aborted}

    def vote(self, user: int, alpha: float, rng: random.Random) -> int | None:
        if rng.random() >= self.feedback_rate:
            return None
        return int(rng.random() < thumbs_up_probability(alpha, self.taste[user]))

    def battle_vote(self, left_alpha: float, right_alpha: float) -> str:
        pl, pr = thumbs_up_probability(left_alpha), thumbs_up_probability(right_alpha)
        u = self.rng.random()
        if u < 0.08:
            return "tie"
        if u < 0.1:
            return "both_bad"
        # Side by side, small differences in quality are easier to see than in a single vote.
        return "left" if self.rng.random() < 1 / (1 + math.exp(-4 * (pl - pr))) else "right"


async def drive_service(service: Any, key: str, population: Population, requests: int,
                        concurrency: int = 32, clock_step: Callable[[], None] | None = None) -> int:
    """Send `requests` simulated chats through an expo_serve.experiments.ExperimentService
    (assign → outcome → feedback)."""
    served = 0

    async def one(i: int) -> None:
        nonlocal served
        rng = population.request_rng(i)
        user = population.visitor(rng)
        a = await service.assign(key, f"user-{user}", f"sim-{i}")
        outcome = population.answer(a.alpha, rng)
        await service.record_outcome(a.exposure_id, **outcome)
        vote = None if outcome["aborted"] else population.vote(user, a.alpha, rng)
        if vote is not None:
            await service.feedback(a.exposure_id, "thumbs", vote)
        served += 1

    for start in range(0, requests, concurrency):
        if clock_step is not None:
            clock_step()
        await asyncio.gather(*[one(i) for i in range(start, min(start + concurrency, requests))])
    return served
