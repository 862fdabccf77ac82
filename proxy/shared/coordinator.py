"""Counters that all gunicorn workers agree on, per service: in flight, waiting, last
activity, a phase flag, and a swap lock per GPU group.

Container state stays in Docker; this holds only what Docker cannot: how
many requests each worker has open right now. It lives in one shared memory block that
the gunicorn master makes before it forks (``ensure_installed`` in gunicorn.conf.py), so
every worker inherits the very same pages. A process without an installed coordinator
(tests calling ``create_app``, ``flask run``) makes a process-local one: same class, same
code.

Layout and rules
- One row per process, claimed on first use: ``[pid, birth, in_flight[S], waiting[S]]``.
  Only the owner writes its row, so ``Admission.release`` (the end of a request) needs no
  cross-process lock: a count only ever goes up under the lock. Totals are sums over the
  rows in use.
- A worker that dies (SIGKILL, gunicorn's heartbeat timeout) leaves its row behind; a
  "reap" finds rows whose process is gone (``/proc/<pid>/stat`` is missing, a zombie, or
  has another start time: pid reuse) and frees them, so their counts vanish. Reaps run on
  every query (``in_flight``, ``waiting``, ...), when a process claims a row, before an
  admission is rejected, and at most every ``REAP_INTERVAL`` s while requests wait in the
  queue. A check is one ``kill(pid, 0)`` per row once the row's start time was verified.
- Per service (not per row): the next queue ticket, the phase with its writer and time,
  the time of the latest activity, and an image pull's progress (four numbers). Per group: the swap lock owner (pid, birth, token) and
  the time it was taken or renewed.
- Anything that must be atomic across processes (every admission, queue moves, phases,
  group locks, claiming and freeing rows, reading totals) runs under one lock: a POSIX record
  lock (``fcntl.lockf``) on the shared memory file plus a lock for the threads/greenlets
  of this process. The kernel drops a record lock when its process dies, so a worker
  killed inside the few microseconds it holds it cannot wedge the others (a
  ``multiprocessing.Lock`` semaphore would stay taken forever). It is only ever tried
  without blocking: on contention we ``time.sleep(0)`` a few times, then sleep 0.2-1 ms,
  which under gevent's monkey patching yields to the worker's other greenlets. The code
  inside the lock is pure arithmetic on shared memory: it never yields, never sleeps,
  never makes a system call, so a holder releases within microseconds.

Everything here is looked up at call time (``time.sleep``, ``threading.Lock``) because this
module is imported in the master before gevent patches the workers.
"""
from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import tempfile
import threading
import time
import weakref
from typing import NamedTuple, Sequence

from .admission import CANCELLED, IN_FLIGHT, QUEUED, REJECTED, Admission
from .processes import alive, start_time

MAGIC = 0x5052_4F58_4343_0001  # "PROXCC", layout version 1
_HEADER = 8  # int64 slots: magic, services, groups, rows, rows used, last token, spare
_H_MAGIC, _H_SERVICES, _H_GROUPS, _H_ROWS, _H_USED, _H_TOKEN = range(6)
_BUSY = (errno.EACCES, errno.EAGAIN)
_LOCK_NB = fcntl.LOCK_EX | fcntl.LOCK_NB

# phases are plain ints; these are the ones the proxy uses
PHASE_NONE = 0
PHASE_STOPPING = 1
PHASE_STARTING = 2
PHASE_PULLING = 3  # a start pulling its image, before the container is made

class CoordinatorFull(RuntimeError):
    """More live processes use the coordinator than it has rows (``max_workers``)."""


class PhaseInfo(NamedTuple):
    phase: int
    pid: int  # the process that set it; 0 if never set
    since: float  # time.monotonic() when it was set; 0.0 if never
    owner_alive: bool


_instances: "weakref.WeakSet[Coordinator]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for coordinator in list(_instances):
        coordinator._forget_process()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the coordinator ---------------------------------------------------------------------

class Coordinator:
    """Shared counters for a fixed set of services and groups; see the module docstring."""

    @classmethod
    def create(cls, service_ids: Sequence[str], group_names: Sequence[str] = (),
               max_workers: int = 64) -> "Coordinator":
        """Make a coordinator in fresh shared memory.

        Call it before forking (in the gunicorn master) so the workers share it.
        ``max_workers`` bounds the processes using it at once: gunicorn's workers, plus
        the old ones still draining during a reload, plus the master if it uses it.
        """
        service_ids, group_names = list(service_ids), list(group_names)
        for kind, names in (("service", service_ids), ("group", group_names)):
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {kind} names: {names}")
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        return cls(service_ids, group_names, max_workers)

    def __init__(self, service_ids: list[str], group_names: list[str], max_workers: int):
        services, groups, rows = len(service_ids), len(group_names), max_workers
        self.service_ids = tuple(service_ids)
        self.group_names = tuple(group_names)
        self.max_workers = rows
        self._services = {sid: i for i, sid in enumerate(service_ids)}
        self._groups = {name: i for i, name in enumerate(group_names)}

        # int64 layout
        self._stride = stride = 2 + 2 * services  # pid, birth, in_flight[S], waiting[S]
        self._rows = _HEADER
        self._tickets = self._rows + rows * stride  # next queue ticket per service
        self._phase = self._tickets + services
        self._phase_pid = self._phase + services
        self._phase_birth = self._phase_pid + services
        self._ready = self._phase_birth + services  # token of the container that answered healthy
        self._failure = self._ready + services  # why the last start failed (a code, 0: it did not)
        self._progress = self._failure + services  # a pull's layers done/total, bytes done/total per service
        self._group = self._progress + 4 * services  # pid, birth, token per group
        ints = self._group + 3 * groups
        # float64 layout
        self._activity = 0  # time.time() per service
        self._phase_since = services  # time.monotonic() per service
        self._group_since = 2 * services  # time.monotonic() per group
        self._last_reap = 2 * services + groups
        self._failed_at = self._last_reap + 1  # time.time() of the last failure per service
        floats = self._failed_at + services

        size = 8 * (ints + floats)
        self._file = _shared_file(size)
        self._fd = self._file.fileno()
        self._mmap = mmap.mmap(self._fd, size)  # MAP_SHARED: forked children see our writes
        view = memoryview(self._mmap)
        self._int = view[:8 * ints].cast("q")
        self._float = view[8 * ints:].cast("d")
        self._zero_row = array.array("q", bytes(8 * stride))
        header = self._int
        header[_H_MAGIC], header[_H_SERVICES], header[_H_GROUPS], header[_H_ROWS] = MAGIC, services, groups, rows
        self._forget_process()
        _instances.add(self)

    def _forget_process(self) -> None:
        """Per-process state: reset in a forked child, which claims a row of its own."""
        self._pid = os.getpid()
        self._birth: int | None = None
        self._base = -1  # offset of this process's row, -1 until claimed
        self._local = threading.Lock()  # the threads/greenlets of this process
        self._verified: dict[int, tuple[int, float]] = {}

    def close(self) -> None:
        """Unmap the memory (tests). Other processes keep their own mapping."""
        _instances.discard(self)
        self._int.release()
        self._float.release()
        self._mmap.close()
        self._file.close()

    def __repr__(self) -> str:
        return f"<Coordinator services={len(self.service_ids)} groups={len(self.group_names)} rows={self.max_workers}>"

    def covers(self, service_ids, group_names=()) -> bool:
        """Whether every service and group named is known here."""
        return all(s in self._services for s in service_ids) and all(g in self._groups for g in group_names)

    # -- admission (the request hot path) -------------------------------------------------

    def admit(self, service_id: str, max_concurrent: int | None = None,
              max_queue: int | None = None) -> "Admission":
        """Count a request for ``service_id``.

        Without ``max_concurrent`` it is in flight at once. With it, it is in flight if a
        slot is free (and no one queued before it needs that slot); else it waits in the
        queue when fewer than ``max_queue`` wait (call ``wait``); else it is rejected (the
        caller answers 429). Always end the admission: ``release()``, or use it as a
        context manager.

        ``admission.phase`` is the service's phase at that same instant (under the same
        lock as ``set_phase``): a stopper that set a phase and then sees no request in
        flight is sure every later request sees its phase.
        """
        s = self._services[service_id]
        base = self._base if self._base >= 0 else self._claim()
        reaped = False
        while True:
            ticket = 0
            self._lock()
            try:
                ints = self._int
                if max_concurrent is None:
                    ints[base + 2 + s] += 1
                    state = IN_FLIGHT
                else:
                    in_flight, waiting = self._totals(s)
                    free = max_concurrent - in_flight
                    if free > waiting:  # room beyond what the queue needs
                        ints[base + 2 + s] += 1
                        state = IN_FLIGHT
                    elif max_queue and waiting < max_queue:
                        ticket = ints[self._tickets + s]
                        ints[self._tickets + s] = ticket + 1
                        ints[base + 2 + len(self.service_ids) + s] += 1
                        state = QUEUED
                    else:
                        state = REJECTED
                phase = ints[self._phase + s]
                self._float[self._activity + s] = time.time()
            finally:
                self._unlock()
            # A worker that died holding slots would block them until reaped: reap, retry.
            if state is not REJECTED or reaped or not self._reap(0):
                return Admission(self, s, state, phase, ticket, max_concurrent or 0)
            reaped = True

    def _totals(self, s: int) -> tuple[int, int]:
        """(in flight, waiting) summed over the rows in use."""
        ints, stride = self._int, self._stride
        start = self._rows + 2 + s
        stop = self._rows + ints[_H_USED] * stride
        waiting_start = start + len(self.service_ids)
        return sum(ints[start:stop:stride]), sum(ints[waiting_start:stop:stride])

    def _try_grant(self, admission: "Admission") -> bool:
        """A queued admission takes a slot if its turn has come (under the lock)."""
        s = admission._service
        self._lock()
        try:
            if admission.state is not QUEUED:
                return admission.state is IN_FLIGHT
            in_flight, waiting = self._totals(s)
            free = admission._limit - in_flight
            # Tickets are handed out in order and the queue holds `waiting` of them, so the
            # oldest waiter has rank <= 0. The rank is exact while no waiter left early, and
            # too small (never too large) otherwise: then a later one may go first.
            rank = admission._ticket - (self._int[self._tickets + s] - waiting)
            if free <= 0 or rank >= free:
                return False
            base = self._base
            self._int[base + 2 + len(self.service_ids) + s] -= 1
            self._int[base + 2 + s] += 1
            admission.state = IN_FLIGHT
            admission.phase = self._int[self._phase + s]
            self._float[self._activity + s] = time.time()
            return True
        finally:
            self._unlock()

    def _withdraw(self, admission: "Admission") -> None:
        self._lock()
        try:
            if admission.state is QUEUED:
                self._int[self._base + 2 + len(self.service_ids) + admission._service] -= 1
                admission.state = CANCELLED
        finally:
            self._unlock()

    # -- queries -------------------------------------------------------------------------

    def in_flight(self, service_id: str) -> int:
        """Requests of this service in flight, across live processes."""
        return self._counts(self._services[service_id])[0]

    def waiting(self, service_id: str) -> int:
        """Requests of this service waiting for a slot, across live processes."""
        return self._counts(self._services[service_id])[1]

    def _counts(self, s: int) -> tuple[int, int]:
        self._reap(0)
        self._lock()  # no admission moves meanwhile; requests may still end
        try:
            return self._totals(s)
        finally:
            self._unlock()

    def last_activity(self, service_id: str) -> float:
        """time.time() of the latest admission, start or end of a request, or touch; 0.0 if never."""
        return self._float[self._activity + self._services[service_id]]

    def touch(self, service_id: str) -> None:
        """Stamp activity without a request (say, when the service was just started)."""
        self._float[self._activity + self._services[service_id]] = time.time()

    # -- phases ----------------------------------------------------------------------------

    def phase(self, service_id: str) -> int:
        return self._int[self._phase + self._services[service_id]]

    def set_phase(self, service_id: str, phase: int, expect: int | None = None) -> bool:
        """Set the phase; with ``expect``, only if it currently is ``expect`` (compare-and-set)."""
        s = self._services[service_id]
        birth = self._my_birth()
        self._lock()
        try:
            ints = self._int
            if expect is not None and ints[self._phase + s] != expect:
                return False
            ints[self._phase + s] = phase
            ints[self._phase_pid + s] = self._pid
            ints[self._phase_birth + s] = birth
            self._float[self._phase_since + s] = time.monotonic()
            return True
        finally:
            self._unlock()

    def phase_info(self, service_id: str) -> PhaseInfo:
        """The phase with who set it and when: a phase whose owner died can be reset
        with ``set_phase(id, PHASE_NONE, expect=info.phase)``."""
        s = self._services[service_id]
        ints = self._int
        phase, pid, birth = ints[self._phase + s], ints[self._phase_pid + s], ints[self._phase_birth + s]
        since = self._float[self._phase_since + s]
        return PhaseInfo(phase, pid, since, bool(pid) and alive(pid, birth, self._verified))

    # -- what every worker must know of a service beyond Docker's word ----------------------

    def ready_token(self, service_id: str) -> int:
        """The token ``set_ready`` stored: whose container answered its health check."""
        return self._int[self._ready + self._services[service_id]]

    def set_ready(self, service_id: str, token: int) -> None:
        self._int[self._ready + self._services[service_id]] = token  # one aligned store: atomic

    def failure(self, service_id: str) -> tuple[int, float]:
        """(code, time.time()) of the last failed start; code 0 when the last start did not fail."""
        s = self._services[service_id]
        return self._int[self._failure + s], self._float[self._failed_at + s]

    def set_failure(self, service_id: str, code: int) -> None:
        s = self._services[service_id]
        self._lock()
        try:
            self._float[self._failed_at + s] = time.time()
            self._int[self._failure + s] = code
        finally:
            self._unlock()

    def progress(self, service_id: str) -> tuple[int, int, int, int]:
        """The last ``set_progress`` of the service's image pull: (layers done, layers total,
        bytes done, bytes total)."""
        at = self._progress + 4 * self._services[service_id]
        self._lock()  # the four together, never half of an update
        try:
            return tuple(self._int[at:at + 4])
        finally:
            self._unlock()

    def set_progress(self, service_id: str, layers_done: int, layers_total: int, bytes_done: int,
                     bytes_total: int) -> None:
        at = self._progress + 4 * self._services[service_id]
        self._lock()
        try:
            self._int[at:at + 4] = array.array("q", (layers_done, layers_total, bytes_done, bytes_total))
        finally:
            self._unlock()

    # -- group swap locks --------------------------------------------------------------------

    def try_lock_group(self, group: str, stale_after: float) -> int | None:
        """Take the group's lock without waiting: a token, or None if someone else holds it.

        A lock whose owner process died, or that was taken or renewed more than
        ``stale_after`` seconds ago, is taken over.
        """
        g = self._groups[group]
        at = self._group + 3 * g
        ints = self._int
        pid, birth, token = ints[at], ints[at + 1], ints[at + 2]
        owner_gone = bool(pid) and not alive(pid, birth, self._verified)  # outside the lock
        my_birth = self._my_birth()
        self._lock()
        try:
            now = time.monotonic()
            if ints[at] and not (ints[at + 2] == token and owner_gone) \
                    and now - self._float[self._group_since + g] <= stale_after:
                return None
            token = ints[_H_TOKEN] + 1
            ints[_H_TOKEN] = token
            ints[at], ints[at + 1], ints[at + 2] = self._pid, my_birth, token
            self._float[self._group_since + g] = now
            return token
        finally:
            self._unlock()

    def lock_group(self, group: str, stale_after: float, deadline: float | None = None,
                   poll: float = 0.02) -> int | None:
        """Wait for the group's lock until ``deadline`` (time.monotonic()); None if not had."""
        while True:
            token = self.try_lock_group(group, stale_after)
            if token is not None:
                return token
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def unlock_group(self, group: str, token: int) -> bool:
        """Release the lock if ``token`` still holds it; False if it was taken over."""
        g = self._groups[group]
        at = self._group + 3 * g
        self._lock()
        try:
            ints = self._int
            if ints[at + 2] != token:
                return False
            ints[at], ints[at + 1], ints[at + 2] = 0, 0, 0
            self._float[self._group_since + g] = 0.0
            return True
        finally:
            self._unlock()

    # -- rows, reaping, the lock -------------------------------------------------------------

    def _my_birth(self) -> int:
        if self._birth is None:
            started = start_time(self._pid)
            self._birth = started if started > 0 else 0
        return self._birth

    def _claim(self) -> int:
        """Claim a row for this process (first use after start or fork)."""
        if self._pid != os.getpid():  # forked by something that skipped the at-fork hooks
            self._forget_process()
        birth = self._my_birth()
        self._reap(0)
        ints, stride = self._int, self._stride
        self._lock()
        try:
            if self._base >= 0:  # another thread of ours was faster
                return self._base
            for row in range(self.max_workers):
                at = self._rows + row * stride
                if ints[at] == 0:
                    ints[at + 2:at + stride] = self._zero_row[2:]
                    ints[at], ints[at + 1] = self._pid, birth
                    if row >= ints[_H_USED]:
                        ints[_H_USED] = row + 1
                    self._base = at
                    return at
        finally:
            self._unlock()
        raise CoordinatorFull(f"all {self.max_workers} coordinator rows are held by live processes; "
                              "raise max_workers")

    def _reap(self, interval: float) -> bool:
        """Free the rows of processes that are gone; True if any was freed.

        With ``interval`` > 0, does nothing if a reap ran less than that long ago.
        """
        floats = self._float
        now = time.monotonic()
        if interval and now - floats[self._last_reap] < interval:
            return False
        floats[self._last_reap] = now
        ints, stride, verified = self._int, self._stride, self._verified
        dead = []
        for row in range(ints[_H_USED]):  # liveness checks outside the lock
            at = self._rows + row * stride
            pid = ints[at]
            if not pid or at == self._base:
                continue
            birth = ints[at + 1]
            if pid == self._pid or not alive(pid, birth, verified):  # our pid in a row not ours: reused
                dead.append((at, pid, birth))
        if not dead:
            return False
        self._lock()
        try:
            for at, pid, birth in dead:
                # not freed and claimed again meanwhile, nor claimed by another thread of ours
                if ints[at] == pid and ints[at + 1] == birth and at != self._base:
                    ints[at:at + stride] = self._zero_row
        finally:
            self._unlock()
        return True

    def _lock(self) -> None:
        if not self._try_lock():
            self._lock_slow()

    def _try_lock(self) -> bool:
        """Both locks at once, without waiting: this process's, then the shared record lock."""
        local = self._local
        if not local.acquire(False):
            return False
        try:
            fcntl.lockf(self._fd, _LOCK_NB)
            return True
        except OSError as error:
            local.release()
            if error.errno not in _BUSY:
                raise
            return False

    def _lock_slow(self) -> None:
        attempts, started, warned = 0, time.monotonic(), False
        while True:
            if self._try_lock():
                return
            attempts += 1
            # time.sleep, looked up now: gevent's once the worker is patched (yields)
            time.sleep(0 if attempts < 20 else 0.0002 if attempts < 200 else 0.001)
            if not warned and attempts % 64 == 0 and time.monotonic() - started > 1.0:
                from loguru import logger
                logger.warning("coordinator lock not had for {:.1f} s (a process stopped while holding it?)",
                               time.monotonic() - started)
                warned = True

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._local.release()


def _shared_file(size: int):
    """An anonymous file of ``size`` zero bytes: the shared memory and the lock target."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("inference-proxy-coordinator")  # close-on-exec by default
        handle = open(fd, "r+b", buffering=0)
    else:
        handle = tempfile.TemporaryFile()
    os.ftruncate(handle.fileno(), size)
    return handle


# -- where workers find the coordinator the master made ---------------------------------------

_installed: Coordinator | None = None


def install(coordinator: Coordinator | None) -> None:
    """Make ``coordinator`` the process's shared one (inherited by forked workers)."""
    global _installed
    _installed = coordinator


def installed() -> Coordinator | None:
    return _installed


def ensure_installed(service_ids: Sequence[str], group_names: Sequence[str] = (),
                     max_workers: int = 64) -> Coordinator:
    """In the gunicorn master: install a coordinator for these services and groups.

    gunicorn runs its config file again on a reload (SIGHUP): the installed one is kept
    while it knows every service and group, so old and new workers keep agreeing.
    """
    current = installed()
    if current is not None and current.covers(service_ids, group_names) \
            and current.max_workers >= max_workers:
        return current
    install(Coordinator.create(service_ids, group_names, max_workers))
    return installed()


def for_services(service_ids: Sequence[str], group_names: Sequence[str] = ()) -> Coordinator:
    """In a worker (``create_app``): the installed coordinator if it knows these services
    and groups, else a new process-local one (not installed, so apps made in one test
    process do not share counters)."""
    current = installed()
    if current is not None:
        if current.covers(service_ids, group_names):
            return current
        from loguru import logger
        logger.warning("the shared coordinator lacks some services or groups (config changed since "
                       "gunicorn started?): limits and counts are per worker until a reload")
    return Coordinator.create(service_ids, group_names, max_workers=8)
