"""Is the process that wrote a row still the same live process? (Linux: /proc start times.)

A pid alone is not enough: a dead worker's pid may be reused by a new process, and a
zombie still answers ``kill(pid, 0)``. The start time in ``/proc/<pid>/stat`` tells them apart.
"""
from __future__ import annotations

import os
import time

_HAVE_PROC = os.path.isdir("/proc/self")
GONE = -1  # start_time(): the process is gone or a zombie
_VERIFY_EVERY = 5.0  # s: how long a (pid, start time) match is trusted without /proc


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux); 0 when unknown."""
    if not _HAVE_PROC:
        return 0
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except FileNotFoundError:
        return GONE
    except OSError:
        return 0
    fields = data[data.rindex(b")") + 2:].split()  # the name may hold spaces and parentheses
    if fields[0] in (b"Z", b"X"):
        return GONE
    return int(fields[19])  # field 22 of proc(5), counted from field 3 (the state)


def alive(pid: int, birth: int, verified: dict) -> bool:
    """Whether the process that wrote (pid, birth) still runs.

    ``verified`` caches when a pid was last matched against its start time, so most
    checks are one ``kill(pid, 0)``; the start time (zombie, pid reuse) is read again
    every ``_VERIFY_EVERY`` s, and a pid is dropped from the cache once seen gone.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        verified.pop(pid, None)
        return False
    except OSError:
        pass  # EPERM: it exists, as another user's process
    if not birth:
        return True
    now = time.monotonic()
    seen = verified.get(pid)
    if seen is not None and seen[0] == birth and now - seen[1] < _VERIFY_EVERY:
        return True
    started = start_time(pid)
    if started == GONE or (started and started != birth):
        verified.pop(pid, None)
        return False
    if started:
        verified[pid] = (birth, now)
    return True
