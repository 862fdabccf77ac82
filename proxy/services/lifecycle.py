"""On-demand model lifecycle: start on first request, wait until ready, stop when idle,
and swap the services of an exclusive GPU group.

What runs is Docker's (the events-fed ``ServiceStates``); what all workers must agree on
beyond that (requests in flight, the last activity, a service being stopped, who is
swapping a group) is the shared ``Coordinator``. Per worker there is only a cache of
which containers answered their health check, and one start greenlet per service that
this worker's waiting requests join.
"""
from __future__ import annotations

import time
from typing import Callable

import gevent
from gevent.event import AsyncResult
from loguru import logger

from ..config import Config, ServiceConfig
from .containers import ContainerInfo, Containers, docker_epoch
from ..shared.coordinator import PHASE_NONE, PHASE_STOPPING, Coordinator
from ..errors import AlreadyRunning, ProxyError, ServiceNotRunning, StartFailed, StartTimeout
from ..metrics.families import observe_start_stage, record_idle_stop, record_start, record_swap
from .readiness import probe, wait_ready
from .container_states import ServiceStates
from ..forwarding.upstream import UpstreamPool

_WAIT_STEP = 0.25         # seconds between looks while a service is being stopped or swapped
_IDLE_CHECK_EVERY = 1.0   # seconds between idle sweeps
_STOPPING_GRACE = 120.0   # a "stopping" flag older than this is a dead worker's: ignore it
_CREATE_RACE_GRACE = 10.0  # seconds another worker's container may take to appear after its create began


class Lifecycle:
    """Makes a service ready for a request, and stops idle ones (one per worker)."""

    def __init__(self, config: Config, containers: Containers, states: ServiceStates,
                 coordinator: Coordinator, pool: UpstreamPool):
        self.config = config
        self.containers = containers
        self.states = states
        self.coordinator = coordinator
        self.pool = pool
        self._ready_ids: set[str] = set()           # container ids that answered their health check
        self._starts: dict[str, AsyncResult] = {}   # this worker's start in progress, per service
        self._idle_loop = None

    # -- the request side ------------------------------------------------------------------

    def ensure_ready(self, service: ServiceConfig, deadline: float,
                     waiting: Callable[[], bool] | None = None) -> None:
        """Return once the service can take the request, starting it if it may.

        Args:
            deadline: a time.monotonic() value; past it, 504 start_timeout.
            waiting: called between waits; returning False abandons the wait (the client
                left). A start already under way goes on: the next request finds it warmer.

        Raises:
            ServiceNotRunning: not running and not autostart.
            StartTimeout: not ready by the deadline.
            ProxyError: the start failed (Docker's message, as from the admin API).
        """
        if not service.autostart:
            # Forward whenever it runs, loading or not: the backend's own 503 says so.
            state = self.states.state(service.id)
            if state.forwardable and not self._stopping(service.id):
                return
            raise ServiceNotRunning(service.id, "stopping" if state.forwardable else state.status)
        while True:
            state = self.states.state(service.id)
            stopping = self._stopping(service.id)
            if not stopping and state.forwardable and self._is_ready(service, state.container):
                return
            if time.monotonic() >= deadline:
                raise StartTimeout(f"Service '{service.id}' was not ready within {service.start_timeout:g} s",
                                   service_id=service.id, hint="Raise start_timeout for large models")
            if waiting is not None and not waiting():
                raise ClientLeft()
            if stopping:
                gevent.sleep(_WAIT_STEP)  # being stopped (idle or swap): start it again after
                continue
            start = self._start_in_background(service)
            try:
                start.get(timeout=min(_WAIT_STEP * 8, max(0.0, deadline - time.monotonic())))
            except gevent.Timeout:
                continue

    def ready_now(self, service: ServiceConfig) -> bool:
        """Could the service take a request this moment, with no start or wait?"""
        state = self.states.state(service.id)
        return state.forwardable and not self._stopping(service.id) and self._is_ready(service, state.container)

    def stopping(self, service_id: str) -> bool:
        """Is a worker stopping this service (idle stop or group swap)?"""
        return self._stopping(service_id)

    def _stopping(self, service_id: str) -> bool:
        if self.coordinator.phase(service_id) != PHASE_STOPPING:
            return False
        info = self.coordinator.phase_info(service_id)
        return info.owner_alive and time.monotonic() - info.since < _STOPPING_GRACE

    def _is_ready(self, service: ServiceConfig, container: ContainerInfo | None) -> bool:
        if container is None or container.container_id is None:
            return probe(self.pool, service)  # the engine has not answered yet: ask the backend
        if container.container_id in self._ready_ids:
            return True
        if probe(self.pool, service):
            self._ready_ids.add(container.container_id)
            return True
        return False

    def _start_in_background(self, service: ServiceConfig) -> AsyncResult:
        """This worker's start of the service; requests join it rather than start again."""
        result = self._starts.get(service.id)
        if result is None or result.ready():
            result = AsyncResult()
            self._starts[service.id] = result
            gevent.spawn(self._start_and_wait, service, result)
        return result

    def _start_and_wait(self, service: ServiceConfig, result: AsyncResult) -> None:
        try:
            token = self._make_room(service)
            try:
                info, created = self._start(service)
                waited_from = time.monotonic()
                outcome, info = wait_ready(self.pool, service, lambda: self.containers.inspect(service),
                                           service.start_timeout)
                if created:  # another worker's start is that worker's to count
                    record_start(service.id, outcome)
                    if outcome == "ready":
                        observe_start_stage(service.id, "ready", time.monotonic() - waited_from)
            finally:
                if token is not None:
                    self.coordinator.unlock_group(service.group, token)
            if outcome != "ready":
                raise ProxyError(f"Container '{service.id}' {'exited' if outcome == 'exited' else 'was not ready'} "
                                 f"while starting on demand (status {info.status}, exit code {info.exit_code})",
                                 status=503 if outcome == "timeout" else 500, code=f"autostart_{outcome}",
                                 service_id=service.id)
            self._ready_ids.add(info.container_id)
            self.states.update(info)
            self.coordinator.touch(service.id)
            logger.info("service {} started on demand and ready", service.id)
            result.set(info)
        except ProxyError as exc:
            logger.warning("starting {} on demand failed: {}", service.id, exc.message)
            result.set_exception(exc)
        except Exception as exc:  # say, the engine's 500 on an inspect: never leave the waiters unanswered
            logger.exception("starting {} on demand failed", service.id)
            result.set_exception(StartFailed(f"Starting '{service.id}' on demand failed: {exc}", service_id=service.id))

    def _start(self, service: ServiceConfig) -> tuple[ContainerInfo, bool]:
        """The container's info, and whether this call created it."""
        try:
            began = time.monotonic()
            info = self.containers.start(service)
            observe_start_stage(service.id, "create", time.monotonic() - began)
            self.states.update(info)
            self.coordinator.touch(service.id)  # so the idle sweep does not stop it at once
            logger.info("starting {} on demand", service.id)
            return info, True
        except AlreadyRunning:
            # Another worker got there first. Docker reserves the name as soon as a create
            # begins, but the container can be inspected only once that create returns: wait
            # for it to appear rather than take "not found" for "exited".
            deadline = time.monotonic() + _CREATE_RACE_GRACE
            info = self.containers.inspect(service)
            while info.status == "not found" and time.monotonic() < deadline:
                gevent.sleep(0.05)
                info = self.containers.inspect(service)
            return info, False
        except ProxyError:
            record_start(service.id, "failed")
            raise

    # -- exclusive groups --------------------------------------------------------------------

    def _make_room(self, service: ServiceConfig) -> int | None:
        """Hold the group's swap lock, and stop its other running services (their requests
        in flight finish first, up to drain_timeout). Returns the lock token, or None."""
        group = self.config.groups.get(service.group) if service.group else None
        if group is None or not group.exclusive:
            return None
        stale_after = service.start_timeout + 2 * max((s.drain_timeout for s in self._members(group.name)), default=0) + 30
        token = self.coordinator.lock_group(group.name, stale_after=stale_after,
                                            deadline=time.monotonic() + stale_after)
        if token is None:
            raise StartTimeout(f"Group '{group.name}' stayed busy swapping", service_id=service.id)
        try:
            for other in self._members(group.name):
                if other.id != service.id and self.containers.inspect(other).status != "not found":
                    logger.info("group {}: making room for {} by stopping {}", group.name, service.id, other.id)
                    if self.stop_drained(other):
                        record_swap(group.name)
        except BaseException:
            self.coordinator.unlock_group(group.name, token)
            raise
        return token

    def _members(self, group_name: str) -> list[ServiceConfig]:
        return [s for s in self.config.services.values() if s.group == group_name]

    def stop_drained(self, service: ServiceConfig) -> bool:
        """Stop a service once its requests in flight have finished (or drain_timeout
        passed). New requests wait meanwhile and start it again later. False when another
        worker is already stopping it."""
        if not self.coordinator.set_phase(service.id, PHASE_STOPPING, expect=PHASE_NONE):
            if not self._stopping(service.id):  # a dead worker's flag: take it over
                self.coordinator.set_phase(service.id, PHASE_STOPPING)
            else:
                return False
        try:
            deadline = time.monotonic() + service.drain_timeout
            in_flight = self.coordinator.in_flight(service.id)
            if in_flight:
                logger.info("stopping {}: waiting up to {:g} s for {} request(s) in flight", service.id,
                            service.drain_timeout, in_flight)
            while in_flight and time.monotonic() < deadline:
                gevent.sleep(0.05)
                in_flight = self.coordinator.in_flight(service.id)
            info, _ = self.containers.stop(service)
            self.states.update(ContainerInfo(service_id=service.id, status="not found"))
            self._ready_ids.discard(info.container_id)
            return True
        finally:
            self.coordinator.set_phase(service.id, PHASE_NONE)

    # -- idle stop ---------------------------------------------------------------------------

    def start_idle_loop(self) -> None:
        if any(s.idle_timeout for s in self.config.services.values()):
            self._idle_loop = gevent.spawn(self._idle_sweeps)

    def stop_idle_loop(self) -> None:
        if self._idle_loop is not None:
            self._idle_loop.kill(block=False)

    def _idle_sweeps(self) -> None:
        while True:
            gevent.sleep(_IDLE_CHECK_EVERY)
            for service in self.config.services.values():
                if service.idle_timeout and self._idle(service):
                    try:
                        if self.stop_drained(service):
                            record_idle_stop(service.id)
                            logger.info("stopped {}: idle for more than {:g} s", service.id, service.idle_timeout)
                    except ProxyError as exc:
                        logger.warning("idle stop of {} failed: {}", service.id, exc.message)

    def _idle(self, service: ServiceConfig) -> bool:
        state = self.states.state(service.id)
        if state.status != "running" or self.coordinator.in_flight(service.id):
            return False
        started = (docker_epoch(state.container.started_at) or 0.0) if state.container else 0.0
        last = max(self.coordinator.last_activity(service.id), started)
        return time.time() - last > service.idle_timeout


class ClientLeft(Exception):
    """The client went away while its request waited for a service to start."""
