"""A service's lifecycle state: the words every answer uses, the moves the lifecycle may
make between them, and how a state follows from Docker's word plus what workers share.

Pure: no Docker, no I/O, so the table and the derivation are tested on their own.
"""
from __future__ import annotations

from dataclasses import dataclass

STOPPED = "stopped"    # no container, or it was removed after a stop
PULLING = "pulling"    # its image is being pulled before the container is made
STARTING = "starting"  # being created, or running but its health_path not yet 200
READY = "ready"        # running and healthy
STOPPING = "stopping"  # draining its requests in flight, or being stopped
FAILED = "failed"      # the last start failed, or the container exited without being asked to
STATES = (STOPPED, PULLING, STARTING, READY, STOPPING, FAILED)

# The moves the lifecycle makes. A container that dies is seen, not made: from any state
# but stopped, the derivation below may report FAILED without a move.
MOVES = {
    STOPPED: frozenset({STARTING, PULLING}),
    FAILED: frozenset({STARTING, PULLING, STOPPING}),
    PULLING: frozenset({STARTING, FAILED, STOPPING}),
    STARTING: frozenset({READY, FAILED, STOPPING}),
    READY: frozenset({STOPPING, FAILED}),
    STOPPING: frozenset({STOPPED, FAILED}),
}

# Why a service is FAILED; the same words are the error codes of a failed start.
REASONS = ("start_failed", "image_unavailable", "volume_missing", "container_exited", "oom_killed",
           "start_timeout")
_REASON_CODES = {reason: number for number, reason in enumerate(REASONS, start=1)}


def can_move(source: str, target: str) -> bool:
    """Whether the lifecycle may take a service from ``source`` to ``target``."""
    return target in MOVES.get(source, ())


def reason_code(reason: str) -> int:
    """The number that stands for a reason in shared memory (0: none)."""
    return _REASON_CODES.get(reason, _REASON_CODES["start_failed"])


def reason_of(code: int) -> str | None:
    return REASONS[code - 1] if 0 < code <= len(REASONS) else None


@dataclass(frozen=True)
class Observed:
    """What one worker knows of a service at one moment."""

    docker_status: str          # Docker's status, "not found", or "unknown" before the engine answered
    phase: str | None = None    # STARTING, PULLING or STOPPING while a live worker does that; else None
    healthy: bool = False       # the running container is the one that answered its health check
    failure: str | None = None  # the reason the last start failed (shared by all workers)
    oom_killed: bool = False


def derive(seen: Observed) -> tuple[str, str | None]:
    """The state, and the reason when FAILED."""
    if seen.phase == STOPPING:
        return STOPPING, None
    status = seen.docker_status
    if status == "running":
        return (READY, None) if seen.healthy else (STARTING, None)
    if seen.phase in (STARTING, PULLING):
        return seen.phase, None
    if status in ("created", "restarting", "paused"):
        return STARTING, None
    if status == "removing":
        return STOPPING, None
    if status in ("exited", "dead"):  # a stop removes its container: this one was not asked to stop
        if seen.failure is not None:
            return FAILED, seen.failure
        return FAILED, "oom_killed" if seen.oom_killed else "container_exited"
    if seen.failure is not None:
        return FAILED, seen.failure
    return STOPPED, None
