"""The lifecycle owner on its own: the state table, the queue that never leaks a place, and
the order of an exclusive group's swap, with a stand-in engine where a real one cannot be
made to misbehave or to be watched step by step."""
from __future__ import annotations

import time

import docker.errors
import gevent
import gevent.event
import pytest

from proxy.config import load_config_text
from proxy.errors import ProxyError
from proxy.forwarding import relay
from proxy.forwarding.upstream import Exchange, UpstreamPool
from proxy.services import lifecycle as lifecycle_module
from proxy.services.container_states import ContainerStates
from proxy.services.engine import ContainerInfo
from proxy.services.lifecycle import Lifecycle
from proxy.services.states import (FAILED, MOVES, PULLING, READY, STARTING, STATES, STOPPED, STOPPING, Observed,
                                   can_move, derive)
from proxy.shared.coordinator import Coordinator

CONFIG = """
groups:
  gpu0: {exclusive: true}
services:
  llm:
    type: llama-cpp-server
    image: example/llama:latest
    port: 8081
    autostart: true
  a:
    type: llama-cpp-server
    image: example/llama:latest
    port: 8082
    group: gpu0
    drain_timeout: 1
  b:
    type: llama-cpp-server
    image: example/llama:latest
    port: 8083
    group: gpu0
  limited:
    type: llama-cpp-server
    image: example/llama:latest
    port: 8084
    max_concurrent: 1
    max_queue: 5
"""


@pytest.fixture
def config():
    return load_config_text(CONFIG)


@pytest.fixture
def coordinator(config):
    coord = Coordinator.create(list(config.services), list(config.groups), max_workers=4)
    yield coord
    coord.close()


# -- the state table -----------------------------------------------------------------------

def test_every_state_has_its_moves_and_no_move_leads_nowhere():
    assert set(MOVES) == set(STATES)
    assert all(target in STATES for targets in MOVES.values() for target in targets)


@pytest.mark.parametrize("source,target", [(STOPPED, STARTING), (FAILED, STARTING), (STARTING, READY),
                                           (STARTING, FAILED), (READY, STOPPING), (STOPPING, STOPPED),
                                           (FAILED, STOPPING), (PULLING, STARTING), (STARTING, STOPPING)])
def test_the_lifecycle_may_make_these_moves(source, target):
    assert can_move(source, target)


@pytest.mark.parametrize("source,target", [(STOPPED, READY), (STOPPED, STOPPING), (READY, STARTING),
                                           (STOPPING, READY), (STOPPING, STARTING), (READY, STOPPED)])
def test_the_lifecycle_may_not_make_these_moves(source, target):
    assert not can_move(source, target)


@pytest.mark.parametrize("seen,expected", [
    (Observed("not found"), (STOPPED, None)),
    (Observed("unknown"), (STOPPED, None)),
    (Observed("running"), (STARTING, None)),
    (Observed("running", healthy=True), (READY, None)),
    (Observed("created"), (STARTING, None)),
    (Observed("not found", phase=STARTING), (STARTING, None)),
    (Observed("running", phase=STOPPING, healthy=True), (STOPPING, None)),
    (Observed("exited"), (FAILED, "container_exited")),
    (Observed("exited", oom_killed=True), (FAILED, "oom_killed")),
    (Observed("exited", failure="start_timeout"), (FAILED, "start_timeout")),
    (Observed("not found", failure="image_unavailable"), (FAILED, "image_unavailable")),
    (Observed("running", healthy=True, failure="start_failed"), (READY, None)),
])
def test_the_state_follows_from_what_docker_and_the_workers_say(seen, expected):
    assert derive(seen) == expected


# -- starts that fail unexpectedly -------------------------------------------------------------

class _EngineAnswers500:
    """A real engine cannot be told to fail an API call with a 500 on demand; this can."""

    prefix = "test"

    def image_present(self, service):
        return True

    def _info(self, service_id):
        return ContainerInfo(service_id, "not found")

    def start(self, service):
        raise docker.errors.APIError("500 Server Error: engine hiccup")


def test_an_unexpected_engine_error_in_an_on_demand_start_answers_the_waiters(config, coordinator):
    service = config.services["llm"]
    pool = UpstreamPool()
    engine = _EngineAnswers500()
    lifecycle = Lifecycle(config, engine, ContainerStates(engine), coordinator, pool)  # never started: no pings
    try:
        start = lifecycle._start_in_background(service)
        with pytest.raises(ProxyError) as caught:
            start.result.get(timeout=5)  # before: the start greenlet died and every waiter hit its deadline
        assert (caught.value.status, caught.value.code) == (500, "start_failed")
        assert "engine hiccup" in caught.value.message
        assert coordinator.failure("llm")[0]  # every worker now reports it failed
        again = lifecycle._start_in_background(service)
        assert again is not start  # the next request tries again instead of joining a dead start
        with pytest.raises(ProxyError):
            again.result.get(timeout=5)
    finally:
        pool.close()


# -- the queue ---------------------------------------------------------------------------------

class _AlwaysReady:
    def ensure_ready(self, service, deadline, waiting=None):
        return None

    def stopping(self, service_id):
        return False


class _Runtime:
    def __init__(self, coordinator):
        self.lifecycle = _AlwaysReady()
        self.coordinator = coordinator


def test_a_queued_request_whose_greenlet_is_killed_gives_its_place_back(config, coordinator, monkeypatch):
    monkeypatch.setattr(time, "sleep", gevent.sleep)  # as in a gevent worker: waiting yields
    service = config.services["limited"]
    runtime = _Runtime(coordinator)
    holder = relay._admit(runtime, service, Exchange(), time.monotonic() + 30)
    assert holder.admitted
    waiter = gevent.spawn(relay._admit, runtime, service, Exchange(), time.monotonic() + 30)
    gevent.sleep(0.1)
    assert coordinator.waiting("limited") == 1
    waiter.kill()  # as a loading stream does when its client leaves
    assert coordinator.waiting("limited") == 0
    holder.release()
    started = time.monotonic()
    nxt = relay._admit(runtime, service, Exchange(), time.monotonic() + 30)
    assert nxt.admitted and time.monotonic() - started < 1  # before: it waited out its deadline
    nxt.release()


# -- an exclusive group's swap ------------------------------------------------------------------

class _RecordingEngine:
    """Containers that start and stop at once, and a log of what happened in which order."""

    prefix = "test"

    def image_present(self, service):
        return True

    def __init__(self, running: set[str]):
        self.running = set(running)
        self.log: list[tuple[str, str, frozenset]] = []

    def _info(self, service_id):
        if service_id in self.running:
            return ContainerInfo(service_id, "running", container_id=f"{abs(hash(service_id)):x}" * 2)
        return ContainerInfo(service_id, "not found")

    def start(self, service):
        self.log.append(("start", service.id, frozenset(self.running)))
        self.running.add(service.id)
        return self._info(service.id)

    def stop(self, service, remove=True):
        self.log.append(("stop", service.id, frozenset(self.running)))
        info = self._info(service.id)
        self.running.discard(service.id)
        return info, 0

    def inspect(self, service):
        return self._info(service.id)


class _StatesFromEngine:
    engine_reachable = True
    hung = gevent.event.Event()  # never set: this engine always answers

    def __init__(self, engine):
        self.engine = engine

    def get(self, service_id):
        return self.engine._info(service_id)

    def update(self, info):
        pass


def test_a_swap_drains_and_stops_the_running_member_before_the_new_one_starts(config, coordinator, monkeypatch):
    monkeypatch.setattr(lifecycle_module, "wait_ready", lambda pool, service, inspect, timeout, abort: ("ready", inspect()))
    monkeypatch.setattr(lifecycle_module, "probe", lambda pool, service: True)
    engine = _RecordingEngine(running={"a"})
    lifecycle = Lifecycle(config, engine, _StatesFromEngine(engine), coordinator, pool=None)
    in_flight = coordinator.admit("a")  # a request of "a" is still streaming
    job = lifecycle.start(config.services["b"])
    assert job.accepted.wait(2)
    gevent.sleep(0.2)
    assert lifecycle.status(config.services["a"]).state == STOPPING  # draining, for every worker to see
    assert engine.log == []  # nothing stopped or started while "a" still serves
    in_flight.release()
    job.result.get(timeout=5)
    assert [(action, service) for action, service, _ in engine.log] == [("stop", "a"), ("start", "b")]
    assert engine.log[1][2] == frozenset()  # when "b" started, nothing else ran
    assert lifecycle.status(config.services["b"]).state == READY
    assert lifecycle.status(config.services["a"]).state == STOPPED


# -- background loops outlive their errors ----------------------------------------------------

class _FlakyLifecycle:
    """A lifecycle whose first stop fails as an engine answering 500 would (not a ProxyError)."""

    def __init__(self, config, coordinator, engine):
        self.config, self.coordinator, self.states = config, coordinator, _StatesFromEngine(engine)
        self.stops = 0

    def stop(self, service, drain=True, only_if_idle=False):
        self.stops += 1
        if self.stops == 1:
            raise docker.errors.APIError("500 Server Error: engine hiccup")
        return lifecycle_module.StopOutcome(True, self.states.get(service.id))


def test_the_idle_sweep_outlives_an_unexpected_engine_error(config, coordinator, monkeypatch):
    from proxy.services import idle
    monkeypatch.setattr(idle, "_CHECK_EVERY", 0.05)
    engine = _RecordingEngine(running={"llm"})
    flaky = _FlakyLifecycle(config, coordinator, engine)
    sweep = idle.IdleSweep(flaky)
    monkeypatch.setattr(sweep, "seconds_left", lambda service: 0.0 if service.id == "llm" else None)
    sweep.start()
    try:
        gevent.sleep(0.5)
    finally:
        sweep.stop()
    assert flaky.stops >= 2  # before: the first error ended the sweeps for good
