"""Merged weights for the hot α values: per-request α at the cost of a merged checkpoint.

When few α values are live (an A/B test's arms), every linear layer can keep W + (1+α)·Δ for
each of them, formed in float32 exactly as the reference merge forms it, and run the rows of that
α as ONE plain product: no second product, no decoding of Δ. Rows of other α values take the
fused path (x·Wᵀ + (1+α)·x·Δᵀ), as without the cache.

This class is the bookkeeping, on the host: which α holds which slot, least recently used first,
within a byte budget (every slot costs the bytes of all merged weights, measured from the
tensors). The model holds the tensors (ExpoForCausalLM.fill_alpha_slot / drop_alpha_slot).

An α gets a slot on demand, when it is in a step's batch and a slot is free, or when the least
recently used slot has been idle for `min_idle_steps` steps: with more live α values than slots
(a sweep), the first ones keep their slots instead of the cache thrashing. Decisions read only
host values (the scheduler's α per sequence), never a device tensor.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable


class AlphaCache:
    def __init__(self, budget_bytes: int, slot_bytes: int, fill: Callable[[int, float], None],
                 drop: Callable[[int], None], *, min_idle_steps: int = 64):
        self.slot_bytes = slot_bytes
        self.capacity = int(budget_bytes // slot_bytes) if slot_bytes > 0 else 0
        self._fill, self._drop = fill, drop
        self.min_idle_steps = min_idle_steps
        self._slots: OrderedDict[float, int] = OrderedDict()  # α -> slot, least recently used first
        self._last_used: dict[float, int] = {}
        self._free = list(range(self.capacity))
        self._step = 0
        self.fills = 0
        self.evictions = 0

    @property
    def cached(self) -> dict[float, int]:
        return dict(self._slots)

    @property
    def bytes_held(self) -> int:
        return len(self._slots) * self.slot_bytes

    def plan(self, alphas: Iterable[float]) -> dict[float, int]:
        """The slot of every α of this step that has (or now gets) merged weights."""
        self._step += 1
        live = list(dict.fromkeys(alphas))
        for alpha in live:
            if alpha in self._slots:
                self._touch(alpha)
        for alpha in live:
            if alpha not in self._slots and self.capacity:
                self._admit(alpha, live)
        return {alpha: self._slots[alpha] for alpha in live if alpha in self._slots}

    def _touch(self, alpha: float) -> None:
        self._slots.move_to_end(alpha)
        self._last_used[alpha] = self._step

    def _admit(self, alpha: float, live: list[float]) -> None:
        if not self._free:
            victim = next(iter(self._slots))
            if victim in live or self._step - self._last_used[victim] < self.min_idle_steps:
                return  # every slot is in use: this α runs fused
            self._drop(self._slots[victim])
            self._free.append(self._slots.pop(victim))
            del self._last_used[victim]
            self.evictions += 1
        slot = self._free.pop()
        self._fill(slot, alpha)
        self._slots[alpha] = slot
        self._touch(alpha)
        self.fills += 1
