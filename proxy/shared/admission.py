"""One request's place under a service's concurrency limit: in flight, queued or rejected.

Made by ``Coordinator.admit``; the counts it changes live in the coordinator's shared
memory, so every worker sees them.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .coordinator import Coordinator

POLL_INTERVAL = 0.015  # s: how often a queued request looks for a free slot
REAP_INTERVAL = 0.25  # s: at most this often a queued request looks for dead workers' slots

# admission states
IN_FLIGHT = "in_flight"
QUEUED = "queued"
REJECTED = "rejected"
RELEASED = "released"
CANCELLED = "cancelled"


class Admission:
    """One request's place: in flight, queued, or rejected. End it with ``release()``
    (or ``with admission:``); ``cancel()`` is the same, for a client that left."""

    __slots__ = ("_coordinator", "_service", "state", "phase", "_ticket", "_limit")

    def __init__(self, coordinator: Coordinator, service: int, state: str, phase: int,
                 ticket: int, limit: int):
        self._coordinator = coordinator
        self._service = service
        self.state = state
        self.phase = phase  # the service's phase when admitted (queued: when it got its slot)
        self._ticket = ticket
        self._limit = limit

    @property
    def service_id(self) -> str:
        return self._coordinator.service_name(self._service)

    @property
    def admitted(self) -> bool:
        return self.state is IN_FLIGHT

    @property
    def queued(self) -> bool:
        return self.state is QUEUED

    @property
    def rejected(self) -> bool:
        return self.state is REJECTED

    def wait(self, deadline: float | None = None, poll: float = POLL_INTERVAL) -> bool:
        """Wait in the queue for a slot until ``deadline`` (a time.monotonic() value; None:
        until admitted or cancelled). True once in flight; False if cancelled or the
        deadline passed (the admission then has left the queue)."""
        coordinator = self._coordinator
        while True:
            if self.state is not QUEUED:
                return self.state is IN_FLIGHT
            if coordinator._try_grant(self):
                return True
            if coordinator._reap(REAP_INTERVAL):  # a dead worker's slots are free now
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                coordinator._withdraw(self)
                return self.state is IN_FLIGHT
            time.sleep(poll if deadline is None else min(poll, deadline - now))

    def release(self) -> None:
        """End the admission, in any state; only the first call counts."""
        state = self.state
        if state is IN_FLIGHT:
            coordinator = self._coordinator
            with coordinator._local:
                if self.state is not IN_FLIGHT:
                    return
                coordinator._int[coordinator._base + 2 + self._service] -= 1
                self.state = RELEASED
            coordinator._float[coordinator._activity + self._service] = time.time()
        elif state is QUEUED:
            self._coordinator._withdraw(self)  # a concurrent grant may win: then release again
            if self.state is IN_FLIGHT:
                self.release()

    cancel = release

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Admission {self.service_id} {self.state}>"
