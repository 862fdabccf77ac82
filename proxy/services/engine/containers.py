"""The one place that talks to Docker: create, start, stop, inspect and read the logs of
each service's container, with every docker-py and transport error made a ``ProxyError``
here, at the boundary, so nothing else needs to know Docker's exceptions.

A container that holds a service's name without our labels is never touched.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator

import docker
import docker.errors
import requests
from loguru import logger

from ...config import ServiceConfig
from ...errors import AlreadyRunning, DockerUnavailable, NameConflict, StartFailed, StopFailed
from .pulls import Progress, pull_image
from .spec import (LABEL_INSTANCE, ContainerInfo, age_seconds, check_volume_sources, create_arguments, hint_for,
                   info_of, is_ours, labels)
from .spec import explanation as _explanation

# Container events that can change what we report; exec_*, attach, health checks cannot.
_STATE_ACTIONS = frozenset({"create", "start", "restart", "die", "stop", "kill", "pause",
                            "unpause", "destroy", "oom", "rename", "update"})
# A 'created' container younger than this is another worker's start in progress.
_START_IN_PROGRESS_SECONDS = 60
# Seconds for ordinary API calls (stop and wait add their own). A hung engine is found by
# the heartbeat's short ping instead (ContainerStates), so this is for a slow, live one.
_DOCKER_TIMEOUT = 10
_UNREACHABLE_HINT = "Start dockerd, or point DOCKER_HOST at a running engine"


class Containers:
    """Docker operations for the configured services, through one lazily made client."""

    def __init__(self, prefix: str, client: docker.DockerClient | None = None,
                 client_factory: Callable[[], docker.DockerClient] | None = None):
        self.prefix = prefix
        self._client = client
        self._client_factory = client_factory or (lambda: docker.from_env(timeout=_DOCKER_TIMEOUT))

    # -- the client ---------------------------------------------------------------------

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = self._client_factory()
            except docker.errors.DockerException as exc:
                raise DockerUnavailable(f"The Docker engine is not reachable: {exc}", hint=_UNREACHABLE_HINT) from None
        return self._client

    def ping(self, timeout: float | None = None) -> bool:
        """Whether the engine answers, within ``timeout`` seconds (the client's own when None)."""
        try:
            api = self.client.api
            return self._call(lambda: api._result(api._get(api._url("/_ping"), timeout=timeout or _DOCKER_TIMEOUT))) == "OK"
        except DockerUnavailable:
            return False

    def _call(self, action: Callable, service: ServiceConfig | str | None = None, keep_api_errors: bool = False):
        """Run one Docker call. An unreachable engine, or any Docker error but NotFound (which
        callers handle) and, with ``keep_api_errors``, the engine's refusals (APIError, which
        the caller turns into its own ProxyError), becomes DockerUnavailable naming the service."""
        service_id = service.id if isinstance(service, ServiceConfig) else service
        try:
            return action()
        except (requests.ConnectionError, requests.Timeout) as exc:
            logger.error("Docker engine unreachable{}: {}", f" (service {service_id})" if service_id else "", exc)
            raise DockerUnavailable("The Docker engine is not reachable", service_id=service_id,
                                    hint=_UNREACHABLE_HINT) from None
        except docker.errors.NotFound:
            raise
        except docker.errors.APIError:
            if keep_api_errors:
                raise
            return self._unavailable(service_id)
        except docker.errors.DockerException:
            return self._unavailable(service_id)

    @staticmethod
    def _unavailable(service_id: str | None):
        """Raise DockerUnavailable for the Docker error being handled."""
        message = _explanation(sys.exc_info()[1])
        logger.error("Docker engine error{}: {}", f" (service {service_id})" if service_id else "", message)
        raise DockerUnavailable(f"The Docker engine answered with an error: {message}", service_id=service_id,
                                hint="Check the engine's health (docker info) and its log") from None

    def name(self, service_id: str) -> str:
        return f"{self.prefix}-{service_id}"

    # -- reading ------------------------------------------------------------------------

    def _get(self, service_id: str):
        """The container holding this service's name, or None."""
        try:
            return self._call(lambda: self.client.containers.get(self.name(service_id)), service_id)
        except docker.errors.NotFound:
            return None

    def inspect(self, service: ServiceConfig) -> ContainerInfo:
        container = self._get(service.id)
        if container is None or not is_ours(container.labels, self.prefix):
            return ContainerInfo(service_id=service.id, status="not found")
        return info_of(container.attrs, service.id)

    def inspect_id(self, container_id: str) -> ContainerInfo | None:
        """One managed container by id, or None when it is gone or not ours."""
        try:
            container = self._call(lambda: self.client.containers.get(container_id))
        except docker.errors.NotFound:
            return None
        return info_of(container.attrs) if is_ours(container.labels, self.prefix) else None

    def list_managed(self) -> dict[str, ContainerInfo]:
        """Every container of this proxy, by service id (one API call)."""
        found = self._call(lambda: self.client.containers.list(
            all=True, filters={"label": f"{LABEL_INSTANCE}={self.prefix}"}))
        infos = (info_of(c.attrs) for c in found if is_ours(c.labels, self.prefix))
        return {info.service_id: info for info in infos if info.service_id}

    def events(self) -> tuple[Iterator[str], Callable[[], None]]:
        """Ids of our containers as Docker reports changes to them, and a closer that
        ends the (otherwise endless) stream from another greenlet."""
        stream = self._call(lambda: self.client.events(
            decode=True, filters={"type": "container", "label": [f"{LABEL_INSTANCE}={self.prefix}"]}))

        def ids() -> Iterator[str]:
            try:
                for event in stream:
                    if event.get("Action", "").split(":")[0] in _STATE_ACTIONS:
                        yield event.get("id") or event.get("Actor", {}).get("ID")
            except (requests.RequestException, docker.errors.DockerException) as exc:
                raise DockerUnavailable(f"The Docker events stream broke off: {exc}") from None

        return ids(), stream.close

    def log_tail(self, service: ServiceConfig, lines: int) -> list[str] | None:
        """The last ``lines`` lines its container wrote (stdout and stderr), or None when
        there is no container of ours."""
        container = self._get(service.id)
        if container is None or not is_ours(container.labels, self.prefix):
            return None
        try:
            data = self._call(lambda: container.logs(stdout=True, stderr=True, tail=lines), service)
        except docker.errors.NotFound:
            return None
        return data.decode("utf-8", "replace").splitlines()[-lines:]

    def logs(self, service: ServiceConfig, tail: int | str, follow: bool, since: float | None,
             timestamps: bool) -> "LogStream | None":
        """Its container's log (stdout and stderr), from the last ``tail`` lines (or "all")
        and, with ``since``, no older than that (seconds since the epoch); with ``follow``
        on until the container stops. None when there is no container of ours."""
        container = self._get(service.id)
        if container is None or not is_ours(container.labels, self.prefix):
            return None
        try:
            stream = self._call(lambda: container.logs(stdout=True, stderr=True, stream=True, follow=follow,
                                                       tail=tail, since=since, timestamps=timestamps), service)
        except docker.errors.NotFound:
            return None
        return LogStream(stream)

    # -- acting -------------------------------------------------------------------------

    def start(self, service: ServiceConfig) -> ContainerInfo:
        """Create and start the service's container (its image must be here: see ``pull``).

        Raises:
            AlreadyRunning: ours, and running or being started by someone else.
            NameConflict: a container not made by this proxy holds the name.
            StartFailed: Docker refused (code start_failed, image_unavailable or
                volume_missing); nothing is left holding the name.
            DockerUnavailable: the engine cannot be reached.
        """
        check_volume_sources(service)
        self._clear_name(service)
        try:
            container = self._create(service)
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # someone else won the race for the name
                raise AlreadyRunning(f"Container '{service.id}' is already starting", service_id=service.id) from None
            raise self._start_failed(service, exc, "create") from None
        try:
            self._call(container.start, service, keep_api_errors=True)
            self._call(container.reload, service)
        except docker.errors.APIError as exc:
            self._remove_quietly(container)
            raise self._start_failed(service, exc, "start") from None
        except DockerUnavailable:
            self._remove_quietly(container)
            raise
        logger.info("container {} started ({})", self.name(service.id), container.short_id)
        return info_of(container.attrs, service.id)

    def _clear_name(self, service: ServiceConfig) -> None:
        """Make the name free for a new container, or say why it cannot be."""
        existing = self._get(service.id)
        if existing is None:
            return
        if not is_ours(existing.labels, self.prefix):
            raise NameConflict(
                f"A container named '{self.name(service.id)}' exists but was not created by this proxy",
                service_id=service.id, hint="Remove or rename that container; the proxy never touches it")
        status = existing.attrs.get("State", {}).get("Status")
        if status in ("running", "restarting", "paused"):
            raise AlreadyRunning(f"Container '{service.id}' is already running", service_id=service.id)
        if status == "created" and age_seconds(existing.attrs.get("Created")) < _START_IN_PROGRESS_SECONDS:
            raise AlreadyRunning(f"Container '{service.id}' is already starting", service_id=service.id)
        logger.info("removing old {} container {} before starting anew", status, existing.short_id)
        self._remove_quietly(existing)

    def _create(self, service: ServiceConfig):
        """Create the container; APIError (ImageNotFound too: pulls are the lifecycle's) is
        left to the caller."""
        kwargs = create_arguments(self.prefix, service)
        return self._call(lambda: self.client.containers.create(**kwargs), service, keep_api_errors=True)

    def image_present(self, service: ServiceConfig) -> bool:
        """Whether the service's image is on this Docker host."""
        try:
            self._call(lambda: self.client.api.inspect_image(service.image), service)
        except docker.errors.NotFound:
            return False
        return True

    def pull(self, service: ServiceConfig, on_progress: Callable[[Progress], None],
             keep_going: Callable[[], bool]) -> bool:
        """Pull the service's image with its progress (see ``pulls.pull_image``)."""
        return pull_image(self.client, service, on_progress, keep_going)

    def _start_failed(self, service: ServiceConfig, exc: docker.errors.APIError, step: str) -> StartFailed:
        message = _explanation(exc)
        logger.error("container {} failed to {}: {}", self.name(service.id), step, message)
        code = "image_unavailable" if isinstance(exc, docker.errors.ImageNotFound) else "start_failed"
        return StartFailed(f"Docker could not {step} the container for '{service.id}': {message}",
                           service_id=service.id, code=code, hint=hint_for(message, service))

    def _remove_quietly(self, container) -> None:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, requests.RequestException) as exc:
            logger.error("could not remove container {}: {}", container.short_id, exc)

    def stop(self, service: ServiceConfig, remove: bool = True) -> tuple[ContainerInfo, int | None]:
        """Stop (SIGTERM, then SIGKILL after stop_timeout) and, unless told not to, remove
        the container (also one that had already exited).

        Returns:
            The container's info before stopping, and its exit code (None if it was not
            running).
        """
        container = self._get(service.id)
        if container is None or not is_ours(container.labels, self.prefix):
            return ContainerInfo(service_id=service.id, status="not found"), None
        info = info_of(container.attrs, service.id)
        exit_code = None
        try:
            if info.running or info.status in ("restarting", "paused", "created"):
                self._call(lambda: container.stop(timeout=int(service.stop_timeout)), service, keep_api_errors=True)
                result = self._call(lambda: container.wait(timeout=_DOCKER_TIMEOUT + service.stop_timeout), service,
                                    keep_api_errors=True)
                exit_code = result.get("StatusCode")
            if remove:
                self._call(lambda: container.remove(force=True), service, keep_api_errors=True)
        except docker.errors.NotFound:
            return info, exit_code  # removed under us: stopped all the same
        except docker.errors.APIError as exc:
            logger.error("container {} failed to stop: {}", self.name(service.id), _explanation(exc))
            raise StopFailed(f"Docker could not stop the container for '{service.id}': {_explanation(exc)}",
                             service_id=service.id, hint="Try again, or stop it with the docker CLI") from None
        logger.info("container {} stopped{} (exit code {})", self.name(service.id),
                    " and removed" if remove else "", exit_code)
        return info, exit_code


class LogStream:
    """One container's log as Docker streams it: its lines (stdout and stderr together, each
    without its newline), and ``close`` to end the stream, and its connection to the engine,
    from another greenlet."""

    LONGEST_LINE = 64 * 1024  # a longer run without a newline is handed on in pieces

    def __init__(self, stream):
        self._stream = stream  # docker-py's CancellableStream of demultiplexed frames
        self.closed = False

    def lines(self) -> Iterator[bytes]:
        pending = b""
        try:
            for frame in self._stream:  # mostly one line each; a long one comes in 16 KiB frames
                pending += frame
                if b"\n" in pending:
                    *complete, pending = pending.split(b"\n")
                    yield from complete
                if len(pending) >= self.LONGEST_LINE:
                    yield pending
                    pending = b""
        except (requests.RequestException, docker.errors.DockerException) as exc:
            if not self.closed:
                logger.warning("a container's log stream broke off: {}", exc)
        if pending:
            yield pending

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._stream.close()
        except (OSError, AttributeError, docker.errors.DockerException):
            pass  # already closed by the engine's side

