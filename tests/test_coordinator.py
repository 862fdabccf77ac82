"""The coordinator's counters, queue, phases and group locks, shared by real forked processes.

Each child is forked after the coordinator was made (as gunicorn forks its workers after
the master made it) and runs the coordinator calls the test sends it over a pipe, so a
test can interleave steps across processes and SIGKILL a child in the middle.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from proxy.shared import coordinator as coordination
from proxy.shared.coordinator import (CANCELLED, IN_FLIGHT, QUEUED, REJECTED, Coordinator, CoordinatorFull,
                               PHASE_NONE, PHASE_STOPPING)

OTHER_PHASE = 2  # phases are plain ints: any other value works the same

ROOT = Path(__file__).resolve().parent.parent
FORK = multiprocessing.get_context("fork")


def _serve(coord: Coordinator, conn) -> None:
    """A child's loop: run each (method, args) it receives, send back ("ok", result) or ("error", repr)."""
    admissions = {}

    def admit(service_id, max_concurrent=None, max_queue=None):
        admission = coord.admit(service_id, max_concurrent, max_queue)
        admissions[len(admissions)] = admission
        return len(admissions) - 1, admission.state

    def wait(handle, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        return admissions[handle].wait(deadline)

    def release(handle):
        admissions[handle].release()
        return admissions[handle].state

    commands = {"admit": admit, "wait": wait, "release": release, "pid": os.getpid,
                "installed_is_same": lambda: coordination.installed() is not None
                and coordination.installed()._mmap is coord._mmap}
    while True:
        name, args = conn.recv()
        if name == "exit":
            return
        try:
            result = commands[name](*args) if name in commands else getattr(coord, name)(*args)
            conn.send(("ok", result))
        except Exception as error:  # the test shows it
            conn.send(("error", repr(error)))


class Child:
    """A forked process that calls the coordinator on command."""

    def __init__(self, coord: Coordinator):
        self.conn, child_end = FORK.Pipe()
        self.proc = FORK.Process(target=_serve, args=(coord, child_end), daemon=True)
        self.proc.start()
        child_end.close()
        self.pid = self.proc.pid

    def send(self, name, *args):
        self.conn.send((name, args))

    def result(self, timeout: float = 20.0):
        assert self.conn.poll(timeout), "child did not answer"
        status, value = self.conn.recv()
        if status == "error":
            raise AssertionError(f"child raised {value}")
        return value

    def call(self, name, *args, timeout: float = 20.0):
        self.send(name, *args)
        return self.result(timeout)

    def has_result(self, timeout: float = 0.0) -> bool:
        return self.conn.poll(timeout)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join(10)  # reaped: the pid is gone, not a zombie

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.send("exit")
            except OSError:
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.kill()


@pytest.fixture
def coord():
    made = Coordinator.create(["llama", "qwen"], ["gpu0"], max_workers=16)
    yield made
    made.close()


@pytest.fixture
def children():
    made: list[Child] = []

    def spawn(coord: Coordinator) -> Child:
        child = Child(coord)
        made.append(child)
        return child

    yield spawn
    for child in made:
        child.stop()


# -- counts -------------------------------------------------------------------------------------

def test_counts_agree_across_processes(coord, children):
    first, second = children(coord), children(coord)
    handles = [first.call("admit", "llama") for _ in range(3)] + [second.call("admit", "llama")]
    assert all(state == IN_FLIGHT for _, state in handles)
    parent = coord.admit("llama")

    for view in (coord.in_flight, lambda s: first.call("in_flight", s), lambda s: second.call("in_flight", s)):
        assert view("llama") == 5
        assert view("qwen") == 0

    first.call("release", handles[0][0])
    first.call("release", handles[0][0])  # a second release does not count
    parent.release()
    assert coord.in_flight("llama") == 3 == second.call("in_flight", "llama")
    for handle, _ in handles[1:3]:
        first.call("release", handle)
    second.call("release", handles[3][0])
    assert coord.in_flight("llama") == 0 == first.call("in_flight", "llama")


def test_a_killed_worker_leaks_no_counts(coord, children):
    doomed, survivor = children(coord), children(coord)
    for _ in range(3):
        doomed.call("admit", "llama")
    doomed.call("admit", "qwen", 4, 10)
    survivor.call("admit", "llama")
    assert coord.in_flight("llama") == 4

    doomed.kill()
    assert coord.in_flight("llama") == 1
    assert coord.in_flight("qwen") == 0
    assert survivor.call("in_flight", "llama") == 1


def test_a_killed_workers_slots_and_queue_places_are_freed(coord, children):
    doomed = children(coord)
    assert doomed.call("admit", "llama", 2, 1)[1] == IN_FLIGHT
    assert doomed.call("admit", "llama", 2, 1)[1] == IN_FLIGHT
    assert doomed.call("admit", "llama", 2, 1)[1] == QUEUED
    assert coord.admit("llama", 2, 1).rejected
    doomed.kill()
    # No query in between: the admission itself notices the dead worker.
    with coord.admit("llama", 2, 1) as admission:
        assert admission.admitted
        assert coord.waiting("llama") == 0


def test_a_reused_pid_does_not_keep_a_dead_workers_counts(coord, children):
    child = children(coord)
    child.call("admit", "llama")
    assert coord.in_flight("llama") == 1
    # As if the worker had died and an unrelated process got its pid: same pid, another start time.
    row = next(at for at in range(coord._rows, coord._tickets, coord._stride) if coord._int[at] == child.pid)
    coord._int[row + 1] += 1
    coord._verified.clear()
    assert coord.in_flight("llama") == 0


def test_rows_of_dead_processes_are_reused():
    small = Coordinator.create(["llama"], [], max_workers=2)
    try:
        small.admit("llama")  # this process holds one row
        for _ in range(3):
            child = Child(small)
            try:
                assert child.call("admit", "llama")[1] == IN_FLIGHT
            finally:
                child.kill()
        assert small.in_flight("llama") == 1
        holder, extra = Child(small), Child(small)
        try:
            holder.call("admit", "llama")
            with pytest.raises(AssertionError, match="CoordinatorFull"):
                extra.call("admit", "llama")
        finally:
            holder.stop()
            extra.stop()
    finally:
        small.close()


def test_threads_of_one_process_count_correctly(coord):
    def hammer():
        for _ in range(2000):
            coord.admit("llama").release()
            with coord.admit("qwen", 1000, 0):
                pass

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert coord.in_flight("llama") == 0 == coord.in_flight("qwen")


# -- admission -------------------------------------------------------------------------------

def test_bounded_admission_across_processes(coord, children):
    first, second, third = children(coord), children(coord), children(coord)
    held, state = first.call("admit", "llama", 2, 1)
    assert state == IN_FLIGHT
    assert second.call("admit", "llama", 2, 1)[1] == IN_FLIGHT
    queued, state = third.call("admit", "llama", 2, 1)
    assert state == QUEUED
    fourth = coord.admit("llama", 2, 1)
    assert fourth.rejected and not fourth.admitted
    fourth.release()  # harmless
    assert coord.waiting("llama") == 1
    assert coord.in_flight("qwen") == 0  # other services are not limited by it

    third.send("wait", queued, 20.0)
    assert not third.has_result(0.2)  # no slot yet: it keeps waiting
    first.call("release", held)
    assert third.result() is True
    assert coord.in_flight("llama") == 2
    assert coord.waiting("llama") == 0
    third.call("release", queued)
    assert coord.in_flight("llama") == 1


def test_queue_is_served_in_order(coord, children):
    holder = coord.admit("llama", 1, 5)
    assert holder.admitted
    waiters = [children(coord) for _ in range(3)]
    handles = []
    for child in waiters:
        handle, state = child.call("admit", "llama", 1, 5)
        assert state == QUEUED
        handles.append(handle)
        child.send("wait", handle, 30.0)
    assert coord.waiting("llama") == 3
    newcomer = coord.admit("llama", 1, 5)
    assert newcomer.queued  # it queues behind them
    assert coord.waiting("llama") == 4

    holder.release()
    for index, child in enumerate(waiters):
        assert child.result() is True
        assert not any(other.has_result(0.1) for other in waiters[index + 1:])  # the others still wait
        child.call("release", handles[index])
    assert newcomer.wait(time.monotonic() + 20)
    newcomer.release()
    assert coord.in_flight("llama") == 0 == coord.waiting("llama")


def test_a_newcomer_goes_first_only_if_the_queue_has_room_to_spare(coord):
    running = [coord.admit("qwen", 3, 5) for _ in range(3)]
    queued = coord.admit("qwen", 3, 5)
    assert queued.queued
    running[0].release()
    running[1].release()  # two slots free, one waiter: a newcomer may take the second
    newcomer = coord.admit("qwen", 3, 5)
    assert newcomer.admitted
    assert queued.wait(time.monotonic() + 10)
    assert coord.in_flight("qwen") == 3


def test_cancel_and_deadline_leave_the_queue(coord):
    holder = coord.admit("llama", 1, 2)
    first, second = coord.admit("llama", 1, 2), coord.admit("llama", 1, 2)
    assert first.queued and second.queued

    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(first.wait(None)))
    waiter.start()
    time.sleep(0.05)
    first.cancel()  # the client left
    waiter.join(10)
    assert outcome == [False] and first.state == CANCELLED
    assert coord.waiting("llama") == 1

    assert second.wait(time.monotonic() + 0.05) is False  # deadline: it left the queue too
    assert second.state == CANCELLED
    assert coord.waiting("llama") == 0
    holder.release()
    assert coord.in_flight("llama") == 0


def test_no_limit_means_no_queue(coord):
    many = [coord.admit("llama", None, 0) for _ in range(50)]
    assert all(a.admitted for a in many)
    zero_queue = coord.admit("qwen", 1, 0)
    assert zero_queue.admitted and coord.admit("qwen", 1, 0).state == REJECTED
    for admission in many + [zero_queue]:
        admission.release()


def test_the_limit_holds_under_contention(coord):
    """Several processes admitting at once never exceed max_concurrent."""
    def run(rounds: int) -> int:
        worst = 0
        for _ in range(rounds):
            admission = coord.admit("llama", 3, 100)
            assert admission.wait(time.monotonic() + 30)
            worst = max(worst, coord.in_flight("llama"))
            admission.release()
        return worst

    results = FORK.Queue()
    procs = [FORK.Process(target=lambda: results.put(run(300))) for _ in range(4)]
    for proc in procs:
        proc.start()
    worst = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(10)
    assert max(worst) <= 3
    assert coord.in_flight("llama") == 0 and coord.waiting("llama") == 0


# -- last activity ---------------------------------------------------------------------------------

def test_last_activity_is_stamped_and_shared(coord, children):
    child = children(coord)
    assert coord.last_activity("llama") == 0.0
    before = time.time()
    handle, _ = child.call("admit", "llama")
    admitted_at = coord.last_activity("llama")
    assert admitted_at >= before
    time.sleep(0.01)
    child.call("release", handle)
    released_at = child.call("last_activity", "llama")
    assert released_at > admitted_at
    assert coord.last_activity("llama") == released_at
    time.sleep(0.01)
    coord.touch("llama")
    assert child.call("last_activity", "llama") > released_at
    assert coord.last_activity("qwen") == 0.0


# -- phases ----------------------------------------------------------------------------------------

def test_phase_compare_and_set_across_processes(coord, children):
    first, second = children(coord), children(coord)
    assert coord.phase("llama") == PHASE_NONE
    assert first.call("set_phase", "llama", PHASE_STOPPING, PHASE_NONE) is True
    assert second.call("set_phase", "llama", OTHER_PHASE, PHASE_NONE) is False
    assert coord.phase("llama") == PHASE_STOPPING == second.call("phase", "llama")
    assert coord.phase("qwen") == PHASE_NONE
    info = coord.phase_info("llama")
    assert info.pid == first.pid and info.owner_alive

    first.kill()  # it dies mid-stop: the flag stays, its owner shows as gone
    info = coord.phase_info("llama")
    assert info.phase == PHASE_STOPPING and not info.owner_alive
    assert second.call("set_phase", "llama", OTHER_PHASE, info.phase) is True
    assert coord.set_phase("llama", 7) is True  # no expect: unconditional
    assert coord.phase("llama") == 7


def test_admissions_see_the_phase_set_before_them(coord, children):
    stopper = children(coord)
    before = coord.admit("llama")
    assert before.phase == PHASE_NONE
    assert stopper.call("set_phase", "llama", PHASE_STOPPING, PHASE_NONE)
    assert stopper.call("in_flight", "llama") == 1  # the stopper waits for this one
    with coord.admit("llama") as after:
        assert after.phase == PHASE_STOPPING  # this one knows not to go ahead
    holder = coord.admit("qwen", 1, 1)
    queued = coord.admit("qwen", 1, 1)
    stopper.call("set_phase", "qwen", OTHER_PHASE)
    holder.release()
    assert queued.wait(time.monotonic() + 10) and queued.phase == OTHER_PHASE
    queued.release()
    before.release()


# -- group locks -----------------------------------------------------------------------------------

def test_group_lock_is_exclusive_across_processes(coord, children):
    first, second = children(coord), children(coord)
    token = first.call("try_lock_group", "gpu0", 60.0)
    assert token
    assert second.call("try_lock_group", "gpu0", 60.0) is None
    assert coord.try_lock_group("gpu0", 60.0) is None

    assert second.call("unlock_group", "gpu0", token + 1000) is False  # not its token
    assert coord.try_lock_group("gpu0", 60.0) is None
    assert first.call("unlock_group", "gpu0", token) is True
    again = second.call("try_lock_group", "gpu0", 60.0)
    assert again and again != token


def test_group_lock_of_a_dead_owner_is_taken_over(coord, children):
    doomed = children(coord)
    token = doomed.call("try_lock_group", "gpu0", 60.0)
    assert coord.try_lock_group("gpu0", 60.0) is None
    doomed.kill()
    mine = coord.try_lock_group("gpu0", 60.0)
    assert mine and mine != token
    assert coord.unlock_group("gpu0", token) is False  # the dead owner's token no longer counts
    assert coord.unlock_group("gpu0", mine) is True


def test_a_stale_group_lock_is_taken_over(coord, children):
    holder = children(coord)
    token = holder.call("try_lock_group", "gpu0", 0.5)
    time.sleep(0.3)
    assert coord.try_lock_group("gpu0", 0.5) is None  # live and fresh: held
    time.sleep(0.3)
    mine = coord.try_lock_group("gpu0", 0.5)  # live but stale: taken over
    assert mine
    assert holder.call("unlock_group", "gpu0", token) is False  # it lost the lock
    assert coord.unlock_group("gpu0", mine) is True


def test_lock_group_waits_for_the_holder(coord, children):
    holder = children(coord)
    token = holder.call("try_lock_group", "gpu0", 60.0)
    assert coord.lock_group("gpu0", 60.0, deadline=time.monotonic() + 0.1) is None
    release = threading.Timer(0.1, lambda: holder.call("unlock_group", "gpu0", token))
    release.start()
    assert coord.lock_group("gpu0", 60.0, deadline=time.monotonic() + 20)
    release.join()


# -- installing ----------------------------------------------------------------------------------

def test_installed_coordinator_is_inherited_by_forked_workers(children):
    try:
        master = coordination.ensure_installed(["llama"], ["gpu0"])
        assert coordination.ensure_installed(["llama"], ["gpu0"]) is master  # a reload keeps it
        assert coordination.for_services(["llama"], ["gpu0"]) is master
        worker = children(master)
        assert worker.call("installed_is_same") is True
        worker.call("admit", "llama")
        assert master.in_flight("llama") == 1

        # A reload that adds a service and a group keeps the coordinator, and its counts.
        assert coordination.ensure_installed(["llama", "new"], ["gpu0", "gpu1"]) is master
        assert master.in_flight("llama") == 1
        worker.call("admit", "new")  # the worker finds the new service's slot by its name
        assert master.in_flight("new") == 1
        master.close()
    finally:
        coordination.install(None)
    assert coordination.installed() is None


def test_services_and_groups_take_slots_by_name_shared_by_every_process(coord, children):
    other = children(coord)
    other.call("admit", "added-later")  # a name this process has never used
    assert coord.in_flight("added-later") == 1
    token = other.call("try_lock_group", "group-added-later", 60.0)
    assert token and coord.try_lock_group("group-added-later", 60.0) is None


def test_the_slots_run_out_with_a_clear_error_and_names_must_fit():
    small = Coordinator.create(["a", "b"], [], max_workers=2, max_services=2, max_groups=1)
    try:
        with pytest.raises(coordination.CoordinatorFull):
            small.admit("c")
        assert small.admit("a").admitted  # the known ones still work
        with pytest.raises(ValueError):
            small.admit("x" * 64)
        with pytest.raises(ValueError):
            Coordinator.create(["a", "a"], [])
    finally:
        small.close()


def test_queued_waits_yield_to_other_greenlets_under_gevent():
    """Made before gevent patches (as in the gunicorn master), a waiting request must not
    block the worker's other greenlets."""
    script = textwrap.dedent("""
        import os
        from proxy.shared.coordinator import Coordinator
        coord = Coordinator.create(["llama"], [])  # the master, unpatched
        pid = os.fork()
        if pid == 0:  # a worker: forked, then patched, as gunicorn's gevent worker does
            from gevent import monkey
            monkey.patch_all()
            import gevent, time
            holder = coord.admit("llama", 1, 1)
            queued = coord.admit("llama", 1, 1)
            assert queued.queued
            ticks = []
            def tick():
                for _ in range(10):
                    ticks.append(time.monotonic())
                    time.sleep(0.01)
                holder.release()
            ticker = gevent.spawn(tick)
            assert queued.wait(time.monotonic() + 10)
            ticker.join()
            assert len(ticks) == 10, ticks
            queued.release()
            os._exit(0 if coord.in_flight("llama") == 0 else 3)
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_full_rows_raise():
    full = Coordinator.create(["llama"], [], max_workers=1)
    try:
        child = Child(full)
        try:
            child.call("admit", "llama")
            with pytest.raises(CoordinatorFull):
                full.admit("llama")
        finally:
            child.stop()
        assert full.admit("llama").admitted  # the child exited: its row is free again
    finally:
        full.close()
