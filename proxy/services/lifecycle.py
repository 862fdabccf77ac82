"""The one owner of every service's lifecycle: each start and stop, whoever asks (the admin
API, a request for an ``autostart`` service, the idle sweep, an exclusive group's swap),
goes through ``Lifecycle``, and every answer reports the same state (``states.py``).

What runs is Docker's word (the events-fed ``ContainerStates``); what all workers must
agree on beyond that lives in the shared ``Coordinator``: requests in flight, a service
being started or stopped (a phase with its owner), whose container answered its health
check, why the last start failed, and each group's swap lock. Per worker there is only one
start greenlet per service, which this worker's waiting requests join.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import gevent
from gevent.event import AsyncResult, Event
from loguru import logger

from ..config import Config, ServiceConfig
from ..errors import (AlreadyRunning, DockerUnavailable, ProxyError, ServiceNotRunning, ServiceStopping, StartFailed,
                      StartTimeout)
from ..masking import masker
from ..metrics.families import observe_start_stage, record_start, record_swap
from ..forwarding.upstream import UpstreamPool
from ..shared.coordinator import PHASE_NONE, PHASE_PULLING, PHASE_STARTING, PHASE_STOPPING, Coordinator
from .container_states import ContainerStates
from .engine import ContainerInfo, Containers, Progress
from .engine.spec import check_volume_sources
from .readiness import probe, wait_ready
from .states import (FAILED, PULLING, READY, STARTING, STOPPED, STOPPING, REASONS, Observed, can_move, derive,
                     reason_code, reason_of)

_WAIT_STEP = 0.25          # seconds between looks while another worker starts or stops a service
_CREATE_RACE_GRACE = 10.0  # seconds another worker's container may take to appear after its create began
_LOG_LINES = 30            # the log tail an error carries
_PHASES = {PHASE_STARTING: STARTING, PHASE_PULLING: PULLING, PHASE_STOPPING: STOPPING}


@dataclass(frozen=True)
class Status:
    """One service's state as every answer reports it."""

    state: str
    reason: str | None
    container: ContainerInfo
    progress: dict | None = None  # while pulling: layers_done, layers_total, bytes_done, bytes_total, percent


@dataclass
class StartJob:
    """A start under way in this worker: ``accepted`` is set once it runs or waits its
    turn (a drain, a stop), ``result`` holds the ready container or the error."""

    result: AsyncResult = field(default_factory=AsyncResult)
    accepted: Event = field(default_factory=Event)


@dataclass(frozen=True)
class StopOutcome:
    stopped: bool               # False: there was nothing to stop
    container: ContainerInfo    # as it was before the stop
    exit_code: int | None = None
    drained: int = 0            # requests in flight that finished within drain_timeout
    cut: int = 0                # requests still in flight when the container was stopped


class Lifecycle:
    """Starts, stops and reports the services (one per worker; they agree through the
    coordinator and Docker)."""

    def __init__(self, config: Config, containers: Containers, states: ContainerStates,
                 coordinator: Coordinator, pool: UpstreamPool):
        self.config = config
        self.containers = containers
        self.states = states
        self.coordinator = coordinator
        self.pool = pool
        self._jobs: dict[str, StartJob] = {}
        self._logs: dict[str, list[str]] = {}  # log tails of dead containers, by container id

    # -- state ----------------------------------------------------------------------------

    def status(self, service: ServiceConfig, probe_health: bool = True) -> Status:
        """The service's state now. ``probe_health``: ask a running container that has not
        yet answered its health check again (a cheap HTTP call, no Docker call)."""
        info = self.states.get(service.id)
        if info.status == "unknown" and probe_health and self.states.engine_reachable is not False:
            try:  # the events stream has not listed our containers yet: ask once
                info = self.containers.inspect(service)
                self.states.update(info)
            except DockerUnavailable:
                pass
        seen = Observed(docker_status=info.status, phase=self._phase(service), oom_killed=bool(info.oom_killed),
                        healthy=self._healthy(service, info, probe_health),
                        failure=reason_of(self.coordinator.failure(service.id)[0]))
        state, reason = derive(seen)
        progress = Progress(*self.coordinator.progress(service.id)).as_dict() if state == PULLING else None
        return Status(state, reason, info, progress)

    def check_health(self, service: ServiceConfig) -> bool:
        """Probe a running container that no start is watching (started with the docker CLI,
        adopted after a restart) and mark it healthy if it answers (no Docker call)."""
        info = self.states.get(service.id)
        if not info.running or self._phase(service) is not None:
            return False
        return self._healthy(service, info, probe_health=True)

    def ready_now(self, service: ServiceConfig) -> bool:
        """Could the service take a request this moment, with no start or wait?"""
        info = self.states.get(service.id)
        return self._phase(service) is None and info.status in ("running", "unknown") \
            and self._healthy(service, info, probe_health=True)

    def stopping(self, service_id: str) -> bool:
        return self._phase(self.config.services[service_id]) == STOPPING

    def _phase(self, service: ServiceConfig) -> str | None:
        """PULLING, STARTING or STOPPING while a live worker does that, else None."""
        info = self.coordinator.phase_info(service.id)
        if info.phase == PHASE_NONE or not info.owner_alive:
            return None
        return _PHASES.get(info.phase)

    def _healthy(self, service: ServiceConfig, info: ContainerInfo, probe_health: bool) -> bool:
        if info.status == "unknown":  # the engine has not answered yet: ask the backend
            return probe_health and probe(self.pool, service)
        if not info.running or info.container_id is None:
            return False
        token = _token(info.container_id)
        if self.coordinator.ready_token(service.id) == token:
            return True
        if probe_health and probe(self.pool, service):
            self.coordinator.set_ready(service.id, token)
            return True
        return False

    def failure_details(self, service: ServiceConfig, info: ContainerInfo) -> dict:
        """exit_code, oom_killed and the masked log tail of a container that is not running."""
        details = {"exit_code": info.exit_code, "oom_killed": bool(info.oom_killed)}
        if info.container_id is not None and not info.running:
            details["logs"] = self._log_tail(service, info.container_id)
        return details

    def _log_tail(self, service: ServiceConfig, container_id: str) -> list[str]:
        if container_id not in self._logs:
            try:
                lines = self.containers.log_tail(service, _LOG_LINES) or []
            except DockerUnavailable:
                return []
            self._logs = {container_id: [self._mask(line) for line in lines]}  # one dead container at a time
        return self._logs[container_id]

    def _mask(self, text: str) -> str:
        return masker(self.config.secrets)(text)

    # -- starting ---------------------------------------------------------------------------

    def start(self, service: ServiceConfig) -> StartJob:
        """Begin a start, or wait for a stop under way and start after it (the admin API).

        Raises:
            AlreadyRunning: it is ready, or a start is under way.
            DockerUnavailable: the engine does not answer (found by the heartbeat).
        """
        try:
            check_volume_sources(service)  # a plain local mistake: say it before anything else
        except StartFailed as exc:
            self.coordinator.set_failure(service.id, reason_code(exc.code))
            raise
        self.check_engine(service)
        current = self.status(service)
        if current.state in (READY, STARTING, PULLING):
            word = "running" if current.state == READY else "being started"
            raise AlreadyRunning(f"Container '{service.id}' is already {word}", service_id=service.id)
        job = self._start_in_background(service)
        assert job is not None  # not STARTING in any worker, as just seen
        return job

    def check_engine(self, service: ServiceConfig) -> None:
        if self.states.engine_reachable is False:
            raise DockerUnavailable("The Docker engine is not answering", service_id=service.id,
                                    hint="Start dockerd, or point DOCKER_HOST at a running engine")

    def ensure_ready(self, service: ServiceConfig, deadline: float,
                     waiting: Callable[[], bool] | None = None) -> None:
        """Return once the service can take a request, starting it if it may (the request
        side).

        Args:
            deadline: a time.monotonic() value; past it, 504 start_timeout.
            waiting: called between waits; returning False abandons the wait (the client
                left). A start already under way goes on: the next request finds it warmer.

        Raises:
            ServiceNotRunning / ServiceStopping: not running and not autostart.
            StartTimeout: not ready by the deadline.
            ProxyError: the start failed, with the code a start fails with.
        """
        began = time.time()
        while True:
            info = self.states.get(service.id)
            phase = self._phase(service)
            if not service.autostart:
                # Forward whenever it runs, loading or not: the backend's own 503 says so.
                if phase == STOPPING:
                    raise ServiceStopping(f"Service '{service.id}' is being stopped", service_id=service.id)
                if info.status in ("running", "unknown"):
                    return
                raise self._not_running(service, info)
            if phase is None and info.status in ("running", "unknown") and self._healthy(service, info, True):
                return
            if time.monotonic() >= deadline:
                raise StartTimeout(f"Service '{service.id}' was not ready within {service.start_timeout:g} s",
                                   service_id=service.id, hint="Raise start_timeout for large models")
            if waiting is not None and not waiting():
                raise ClientLeft()
            job = self._start_in_background(service) if phase != STOPPING else None
            if job is None:  # another worker starts or stops it: look again soon
                self._raise_if_failed_since(service, began)
                gevent.sleep(_WAIT_STEP)
                continue
            try:
                job.result.get(timeout=min(2.0, max(0.0, deadline - time.monotonic())))
            except gevent.Timeout:
                continue

    def _not_running(self, service: ServiceConfig, info: ContainerInfo) -> ServiceNotRunning:
        current = self.status(service, probe_health=False)
        extra = {"state": current.state, "reason": current.reason}
        if info.container_id is not None:
            extra.update(self.failure_details(service, info))
        return ServiceNotRunning(service.id, info.status if info.status != "not found" else "not running", extra=extra)

    def _raise_if_failed_since(self, service: ServiceConfig, since: float) -> None:
        code, when = self.coordinator.failure(service.id)
        if code and when >= since:
            reason = reason_of(code)
            raise (StartTimeout if reason == "start_timeout" else StartFailed)(
                f"Starting '{service.id}' failed ({reason})", code=reason, service_id=service.id)

    def _start_in_background(self, service: ServiceConfig) -> StartJob | None:
        """This worker's start of the service, joined by later callers; None when another
        worker is starting it."""
        job = self._jobs.get(service.id)
        if job is not None and not job.result.ready():
            return job
        if self._phase(service) in (STARTING, PULLING):
            return None
        job = StartJob()
        self._jobs[service.id] = job
        gevent.spawn(self._run_start, service, job)
        return job

    def _run_start(self, service: ServiceConfig, job: StartJob) -> None:
        try:
            info = self._start(service, job)
            logger.info("service {} is ready", service.id)
            job.result.set(info)
        except ProxyError as exc:
            if exc.code in REASONS:
                self.coordinator.set_failure(service.id, reason_code(exc.code))
            if exc.code in ("start_failed", "image_unavailable", "volume_missing"):
                record_start(service.id, "failed")  # before a container ran (exits and timeouts are counted)
            logger.log("WARNING" if isinstance(exc, ServiceStopping) else "ERROR", "starting {} failed: {}",
                        service.id, exc.message)
            job.result.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - never leave the waiters of a start unanswered
            logger.exception("starting {} failed", service.id)
            self.coordinator.set_failure(service.id, reason_code("start_failed"))
            job.result.set_exception(StartFailed(f"Starting '{service.id}' failed: {exc}", service_id=service.id))
        finally:
            job.accepted.set()

    def _start(self, service: ServiceConfig, job: StartJob) -> ContainerInfo:
        self._claim(service, PHASE_STARTING, job)
        try:
            self.coordinator.set_failure(service.id, 0)
            self._pull_if_needed(service, job)  # before a swap: the running member serves meanwhile
            began = time.monotonic()  # start_timeout counts from here: a pull may take far longer
            token = self._make_room(service, job)
            try:
                if self.coordinator.phase(service.id) != PHASE_STARTING:  # a stop came meanwhile
                    raise ServiceStopping(f"Service '{service.id}' was stopped before it started",
                                          service_id=service.id)
                created = time.monotonic()
                info = self._create(service)
                observe_start_stage(service.id, "create", time.monotonic() - created)
                job.accepted.set()
                self.states.update(info)
                self.coordinator.touch(service.id)  # so the idle sweep does not stop it at once
                remaining = max(0.0, service.start_timeout - (time.monotonic() - began))
                waited_from = time.monotonic()
                outcome, info = wait_ready(self.pool, service, lambda: self.containers.inspect(service), remaining,
                                           abort=lambda: self._phase(service) == STOPPING)
                if outcome != "aborted":
                    record_start(service.id, outcome)
                if outcome == "ready":
                    observe_start_stage(service.id, "ready", time.monotonic() - waited_from)
            finally:
                if token is not None:
                    self.coordinator.unlock_group(service.group, token)
            return self._settle(service, outcome, info)
        finally:
            if not self.coordinator.set_phase(service.id, PHASE_NONE, expect=PHASE_STARTING):
                self.coordinator.set_phase(service.id, PHASE_NONE, expect=PHASE_PULLING)  # the pull failed

    def _pull_if_needed(self, service: ServiceConfig, job: StartJob) -> None:
        """Pull the service's image as its pull_policy says, in the PULLING phase, with its
        progress in the coordinator for every worker to report."""
        if self.states.get(service.id).running:
            return  # another worker's start made it meanwhile: nothing to pull for
        if service.pull_policy != "always" and self.containers.image_present(service):
            return
        if service.pull_policy == "never":
            raise StartFailed(f"Image '{service.image}' is not on this Docker host and pull_policy is never",
                              code="image_unavailable", service_id=service.id,
                              hint=f"Pull or build it, or set services.{service.id}.pull_policy to missing")
        if not self.coordinator.set_phase(service.id, PHASE_PULLING, expect=PHASE_STARTING):
            raise ServiceStopping(f"Service '{service.id}' was stopped before it started", service_id=service.id)
        self.coordinator.set_progress(service.id, 0, 0, 0, 0)

        def on_progress(progress: Progress) -> None:
            self.coordinator.set_progress(service.id, *progress)
            job.accepted.set()  # the engine took the pull: the admin API may answer now

        began = time.monotonic()
        pulled = self.containers.pull(service, on_progress,
                                      keep_going=lambda: self.coordinator.phase(service.id) == PHASE_PULLING)
        if not pulled or not self.coordinator.set_phase(service.id, PHASE_STARTING, expect=PHASE_PULLING):
            raise ServiceStopping(f"Service '{service.id}' was stopped while its image was pulled",
                                  service_id=service.id)
        observe_start_stage(service.id, "pull", time.monotonic() - began)

    def _claim(self, service: ServiceConfig, phase: int, job: StartJob | None = None) -> None:
        """Take the service's phase; wait while another worker stops it."""
        deadline = time.monotonic() + self._phase_lifetime(service)
        while not self.coordinator.set_phase(service.id, phase, expect=PHASE_NONE):
            if self._phase(service) is None:  # a dead worker's phase: take it over
                current = self.coordinator.phase_info(service.id).phase
                if self.coordinator.set_phase(service.id, phase, expect=current):
                    return
                continue
            if job is not None:
                job.accepted.set()  # it waits its turn: the admin API may answer now
            if time.monotonic() >= deadline:
                raise StartTimeout(f"Service '{service.id}' stayed busy being stopped or started",
                                   service_id=service.id)
            gevent.sleep(_WAIT_STEP)

    def _phase_lifetime(self, service: ServiceConfig) -> float:
        return service.start_timeout + service.drain_timeout + service.stop_timeout + 30

    def _create(self, service: ServiceConfig) -> ContainerInfo:
        try:
            logger.info("starting {}", service.id)
            return self.containers.start(service)
        except AlreadyRunning:
            # Started outside the lifecycle (say, the docker CLI). Docker reserves the name as
            # soon as a create begins, but the container can be inspected only once that
            # create returns: wait for it to appear rather than take "not found" for "exited".
            deadline = time.monotonic() + _CREATE_RACE_GRACE
            info = self.containers.inspect(service)
            while info.status == "not found" and time.monotonic() < deadline:
                gevent.sleep(0.05)
                info = self.containers.inspect(service)
            return info
        except ProxyError:
            record_start(service.id, "failed")
            raise

    def _settle(self, service: ServiceConfig, outcome: str, info: ContainerInfo) -> ContainerInfo:
        """The ready container, or the error that says why the start failed."""
        if outcome == "ready":
            self.coordinator.set_ready(service.id, _token(info.container_id))
            self.states.update(info)
            return info
        if outcome == "aborted":
            raise ServiceStopping(f"Service '{service.id}' was stopped while it started", service_id=service.id)
        if outcome == "timeout":
            # Not ready in time: stop it (it holds its GPUs for nothing) but keep it, so its
            # logs can be read until the next start.
            self.containers.stop(service, remove=False)
            info = self.containers.inspect(service)
            raise StartTimeout(f"Container '{service.id}' was not ready within {service.start_timeout:g} s",
                               service_id=service.id, hint="Raise start_timeout for large models",
                               extra=self.failure_details(service, info))
        details = self.failure_details(service, info)
        raise StartFailed(f"Container '{service.id}' exited while starting (exit code {info.exit_code})",
                          code="oom_killed" if info.oom_killed else "container_exited", service_id=service.id,
                          hint="Its last log lines are in error.logs", extra=details)

    # -- exclusive groups -------------------------------------------------------------------

    def _make_room(self, service: ServiceConfig, job: StartJob) -> int | None:
        """Hold the group's swap lock, and stop its other services (their requests in flight
        finish first, up to drain_timeout). Returns the lock token, or None."""
        group = self.config.groups.get(service.group) if service.group else None
        if group is None or not group.exclusive:
            return None
        members = [s for s in self.config.services.values() if s.group == group.name]
        stale_after = service.start_timeout + 2 * max(s.drain_timeout + s.stop_timeout for s in members) + 30
        token = self.coordinator.try_lock_group(group.name, stale_after)
        if token is None:
            job.accepted.set()  # another swap goes first: the admin API may answer now
            token = self.coordinator.lock_group(group.name, stale_after=stale_after,
                                                deadline=time.monotonic() + stale_after)
        if token is None:
            raise StartTimeout(f"Group '{group.name}' stayed busy swapping", service_id=service.id)
        try:
            for other in members:
                if other.id != service.id and self.status(other, probe_health=False).state != STOPPED:
                    logger.info("group {}: making room for {} by stopping {}", group.name, service.id, other.id)
                    job.accepted.set()
                    if self.stop(other, drain=True).stopped:
                        record_swap(group.name)
        except BaseException:
            self.coordinator.unlock_group(group.name, token)
            raise
        return token

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, service: ServiceConfig, drain: bool = True, only_if_idle: bool = False) -> StopOutcome:
        """Stop the service: new requests wait (autostart) or get 503 service_stopping;
        requests in flight get up to drain_timeout (none with ``drain=False``); then the
        container is stopped (stop_timeout) and removed. A start under way is abandoned.

        ``only_if_idle`` (the idle sweep): do nothing when another worker is already
        starting or stopping it.
        """
        current = self.status(service, probe_health=False)
        if current.state == STOPPED:
            return StopOutcome(False, current.container)
        if current.state == STOPPING or (only_if_idle and self._phase(service) is not None):
            if only_if_idle:
                return StopOutcome(False, current.container)
            self._wait_for_phase_end(service)
            return StopOutcome(False, current.container)
        assert can_move(current.state, STOPPING), current.state
        if only_if_idle:
            if not self.coordinator.set_phase(service.id, PHASE_STOPPING, expect=PHASE_NONE):
                return StopOutcome(False, current.container)
        else:
            self.coordinator.set_phase(service.id, PHASE_STOPPING)  # a start under way sees it and gives up
        try:
            in_flight = initially = self.coordinator.in_flight(service.id)
            if drain and in_flight:
                logger.info("stopping {}: waiting up to {:g} s for {} request(s) in flight", service.id,
                            service.drain_timeout, in_flight)
                deadline = time.monotonic() + service.drain_timeout
                while in_flight and time.monotonic() < deadline:
                    gevent.sleep(0.05)
                    in_flight = self.coordinator.in_flight(service.id)
            info, exit_code = self.containers.stop(service)
            self.states.update(ContainerInfo(service_id=service.id, status="not found"))
            self.coordinator.set_ready(service.id, 0)
            self.coordinator.set_failure(service.id, 0)
            return StopOutcome(True, info, exit_code, drained=max(0, initially - in_flight), cut=in_flight)
        finally:
            self.coordinator.set_phase(service.id, PHASE_NONE, expect=PHASE_STOPPING)

    def _wait_for_phase_end(self, service: ServiceConfig) -> None:
        deadline = time.monotonic() + self._phase_lifetime(service)
        while self._phase(service) is not None and time.monotonic() < deadline:
            gevent.sleep(_WAIT_STEP)


class ClientLeft(Exception):
    """The client went away while its request waited for a service to start."""


def _token(container_id: str | None) -> int:
    """A container id as a number that fits the coordinator's int64 cells (60 bits)."""
    return int(container_id[:15], 16) if container_id else 0

