"""Pairwise battles as a user meets them: one prompt answered at two arms, shown blind, then a vote
that reveals which arm and α each side was. (Their analysis, Bradley–Terry, is in battles.py.)"""
from __future__ import annotations

import secrets
import uuid
from typing import Awaitable, Callable

from .battles import OUTCOMES
from .catalog import LiveExperiment
from .errors import ExperimentError
from .records import BattleRow
from .store import ExperimentStore


async def create_battle(store: ExperimentStore, state: LiveExperiment, messages: list[dict],
                        generate_pair: Callable[..., Awaitable[list[str]]], *, unit_id: str | None,
                        clock: Callable[[], float], **options) -> dict:
    """One prompt at two distinct arms (a uniformly random pair), left/right at random, α hidden."""
    key = state.definition.key
    left, right = secrets.SystemRandom().sample(state.definition.arms, 2)
    texts = await generate_pair(messages, [left.alpha, right.alpha], **options)
    if not isinstance(texts, (list, tuple)) or len(texts) != 2 or not all(isinstance(t, str) for t in texts):
        raise ExperimentError("The battle generator did not return two texts.", status=500, code="generation_failed")
    battle = BattleRow("bat_" + uuid.uuid4().hex, key, state.phase, left.name, right.name, left.alpha, right.alpha)
    await store.create_battle(battle, unit_id, clock())  # after the generation
    return {"id": battle.battle_id, "object": "battle", "experiment": key,
            "left": {"content": texts[0]}, "right": {"content": texts[1]}}


async def vote(store: ExperimentStore, battle_id: str, winner: str, now: float) -> dict:
    if winner not in OUTCOMES:
        raise ExperimentError(f"`winner` must be one of {', '.join(OUTCOMES)}.", param="winner", code="invalid_value")
    row = await store.vote(battle_id, winner, now)
    # Revealed only after the vote, so the voter could not know the α.
    return {"id": battle_id, "object": "battle.vote", "winner": winner, "experiment": row.key,
            "left": {"arm": row.left_arm, "alpha": row.left_alpha},
            "right": {"arm": row.right_arm, "alpha": row.right_alpha}}
