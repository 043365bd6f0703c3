"""The bounded queue: how many sequences may be in flight before new requests get 503.

The engine runs up to `max_num_seqs` sequences; `max_queue` more may wait in it. A request needs
one sequence per prompt, per α and per choice (n). One that would overflow the bound is refused
at once with 503 and Retry-After, instead of waiting where its client cannot see why. A request
larger than the whole bound could never be served: `check_size` refuses it with a 400. Counting
happens on the event loop only, so no lock is needed.
"""
from __future__ import annotations

from .errors import APIError, invalid

RETRY_AFTER_S = 1


def shutting_down(close: bool = False, cut: bool = False) -> APIError:
    """The 503 of a draining server (with `close`, the connection closes after it: the client's
    next request goes to a fresh connection, on another replica behind a balancer)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} | ({"Connection": "close"} if close else {})
    message = ("The server reached its shutdown deadline before this request finished; retry on another replica "
               "or later." if cut else "The server is shutting down; retry on another replica or later.")
    return APIError(503, message, code="server_shutting_down", headers=headers)


class AdmissionGate:
    def __init__(self, max_running: int, max_queue: int):
        self.capacity = max_running + max_queue
        self.in_flight = 0
        self.closed = False  # set when the server starts draining

    def close(self) -> None:
        """From now on every request gets 503: the server is draining."""
        self.closed = True

    def check_size(self, sequences: int) -> None:
        if sequences > self.capacity:
            raise invalid(f"The request asks for {sequences} sequences (prompts × alpha values × n); this server "
                          f"takes at most {self.capacity} at once.", param="n", code="too_many_sequences")

    def admit(self, sequences: int) -> "Ticket":
        if self.closed:
            raise shutting_down()
        if self.in_flight + sequences > self.capacity:
            raise APIError(503, f"The server is at capacity ({self.in_flight} sequences in flight, at most "
                                f"{self.capacity}); retry after {RETRY_AFTER_S} s.",
                           code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += sequences
        return Ticket(self, sequences)


class Ticket:
    """A request's place in the gate; release it exactly once when the request ends (idempotent)."""

    def __init__(self, gate: AdmissionGate, sequences: int):
        self._gate = gate
        self._sequences = sequences

    def release(self) -> None:
        self._gate.in_flight -= self._sequences
        self._sequences = 0
