"""The only module that talks to Docker: create, start, stop and inspect each service's
container, with labels, GPU device requests and Docker's errors made plain.

State lives in Docker, not in a worker: a managed container has a
deterministic name ``<prefix>-<service id>`` (the name doubles as a lock, so concurrent
starts make one container) and labels that say it is ours, for which service, under which
config. A container that holds the name without our labels is never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

import docker
import docker.errors
import requests
from docker.types import DeviceRequest
from loguru import logger

from ..config import ServiceConfig
from ..errors import AlreadyRunning, DockerUnavailable, NameConflict, ProxyError, StartFailed, StopFailed

LABEL_MANAGED = "io.inference-proxy.managed"
LABEL_INSTANCE = "io.inference-proxy.instance"
LABEL_SERVICE = "io.inference-proxy.service"
LABEL_CONFIG_HASH = "io.inference-proxy.config-hash"

# Container events that can change what we report; exec_*, attach, health checks cannot.
_STATE_ACTIONS = frozenset({"create", "start", "restart", "die", "stop", "kill", "pause",
                            "unpause", "destroy", "oom", "rename", "update"})
# A 'created' container younger than this is another worker's start in progress.
_START_IN_PROGRESS_SECONDS = 60
_DOCKER_TIMEOUT = 30  # seconds for ordinary API calls; stop adds the service's stop_timeout



@dataclass(frozen=True)
class ContainerInfo:
    """What Docker says about one service's container (status "not found" when none)."""

    service_id: str
    status: str
    container_id: str | None = None
    image: str | None = None
    started_at: str | None = None
    exit_code: int | None = None
    oom_killed: bool | None = None
    config_hash: str | None = None

    @property
    def running(self) -> bool:
        return self.status == "running"


# What shapes the container; timeouts, health paths and body limits are the proxy's own
# business, so changing them does not make a running container stale.
_CONTAINER_FIELDS = ("type", "image", "port", "container_port", "args", "volumes", "environment", "resources")


def config_hash(service: ServiceConfig) -> str:
    """A short, stable digest of everything that shapes the container."""
    shaping = {name: value for name, value in service.to_dict().items() if name in _CONTAINER_FIELDS}
    encoded = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def device_requests(gpus) -> list[DeviceRequest]:
    """The ``resources.gpus`` forms as NVIDIA device requests: all, a count, or ids."""
    if gpus is None:
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if isinstance(gpus, int):
        return [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
    return [DeviceRequest(device_ids=list(gpus), capabilities=[["gpu"]])]


def hint_for(message: str, service: ServiceConfig) -> str:
    """A plain next step for the Docker failures users meet most."""
    text = message.lower()
    if "could not select device driver" in text or "nvidia" in text:
        return ("The service asks for GPUs but the Docker engine has no NVIDIA runtime: install the "
                "NVIDIA Container Toolkit and restart dockerd, or remove resources.gpus")
    if "port is already allocated" in text or "address already in use" in text:
        return f"Host port {service.port} is taken by another process or container: free it or change services.{service.id}.port"
    if "no such image" in text or "pull access denied" in text or "manifest unknown" in text or "not found" in text:
        return f"Image '{service.image}' is not on this Docker host and could not be pulled: build or pull it, or fix services.{service.id}.image"
    return "Docker refused the container; its message says why"


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
                raise DockerUnavailable(f"The Docker engine is not reachable: {exc}",
                                        hint="Start dockerd, or point DOCKER_HOST at a running engine") from None
        return self._client

    def ping(self) -> bool:
        try:
            return bool(self._call(lambda: self.client.ping()))
        except ProxyError:
            return False

    def _call(self, action: Callable, service: ServiceConfig | None = None):
        """Run one Docker call; an unreachable engine becomes DockerUnavailable."""
        try:
            return action()
        except (requests.ConnectionError, requests.Timeout) as exc:
            logger.error("Docker engine unreachable: {}", exc)
            raise DockerUnavailable("The Docker engine is not reachable",
                                    service_id=service.id if service else None,
                                    hint="Start dockerd, or point DOCKER_HOST at a running engine") from None

    def name(self, service_id: str) -> str:
        return f"{self.prefix}-{service_id}"

    def labels(self, service: ServiceConfig) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_INSTANCE: self.prefix,
                LABEL_SERVICE: service.id, LABEL_CONFIG_HASH: config_hash(service)}

    def _is_ours(self, container) -> bool:
        labels = container.labels or {}
        return labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_INSTANCE) == self.prefix

    # -- reading ------------------------------------------------------------------------

    def info(self, container, service_id: str | None = None) -> ContainerInfo:
        attrs = container.attrs
        state = attrs.get("State", {})
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        return ContainerInfo(
            service_id=service_id or labels.get(LABEL_SERVICE, ""),
            status=state.get("Status", "unknown"),
            container_id=attrs.get("Id"),
            image=(attrs.get("Config") or {}).get("Image"),
            started_at=_docker_time(state.get("StartedAt")),
            exit_code=None if state.get("Running") else state.get("ExitCode"),
            oom_killed=state.get("OOMKilled"),
            config_hash=labels.get(LABEL_CONFIG_HASH),
        )

    def _get(self, service_id: str):
        """The container holding this service's name, or None."""
        try:
            return self._call(lambda: self.client.containers.get(self.name(service_id)))
        except docker.errors.NotFound:
            return None

    def inspect(self, service: ServiceConfig) -> ContainerInfo:
        container = self._get(service.id)
        if container is None or not self._is_ours(container):
            return ContainerInfo(service_id=service.id, status="not found")
        return self.info(container, service.id)

    def inspect_id(self, container_id: str) -> ContainerInfo | None:
        """One managed container by id, or None when it is gone or not ours."""
        try:
            container = self._call(lambda: self.client.containers.get(container_id))
        except docker.errors.NotFound:
            return None
        return self.info(container) if self._is_ours(container) else None

    def list_managed(self) -> dict[str, ContainerInfo]:
        """Every container of this proxy, by service id (one API call)."""
        found = self._call(lambda: self.client.containers.list(
            all=True, filters={"label": f"{LABEL_INSTANCE}={self.prefix}"}))
        infos = (self.info(c) for c in found if self._is_ours(c))
        return {info.service_id: info for info in infos if info.service_id}

    def events(self) -> tuple[Iterator[str], Callable[[], None]]:
        """Ids of our containers as Docker reports changes to them, and a closer that
        ends the (otherwise endless) stream from another greenlet."""
        stream = self._call(lambda: self.client.events(
            decode=True, filters={"type": "container", "label": [f"{LABEL_INSTANCE}={self.prefix}"]}))

        def ids() -> Iterator[str]:
            for event in stream:
                if event.get("Action", "").split(":")[0] in _STATE_ACTIONS:
                    yield event.get("id") or event.get("Actor", {}).get("ID")

        return ids(), stream.close

    # -- acting -------------------------------------------------------------------------

    def start(self, service: ServiceConfig) -> ContainerInfo:
        """Create and start the service's container.

        Raises:
            AlreadyRunning: ours, and running or being started by someone else.
            NameConflict: a container not made by this proxy holds the name.
            StartFailed: Docker refused; nothing is left holding the name.
            DockerUnavailable: the engine cannot be reached.
        """
        _check_volume_sources(service)
        self._clear_name(service)
        try:
            container = self._call(lambda: self._create(service), service)
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # someone else won the race for the name
                raise AlreadyRunning(f"Container '{service.id}' is already starting", service_id=service.id) from None
            raise self._start_failed(service, exc, "create") from None
        try:
            self._call(container.start, service)
        except docker.errors.APIError as exc:
            self._remove_quietly(container)
            raise self._start_failed(service, exc, "start") from None
        container.reload()
        logger.info("container {} started ({})", self.name(service.id), container.short_id)
        return self.info(container, service.id)

    def _clear_name(self, service: ServiceConfig) -> None:
        """Make the name free for a new container, or say why it cannot be."""
        existing = self._get(service.id)
        if existing is None:
            return
        if not self._is_ours(existing):
            raise NameConflict(
                f"A container named '{self.name(service.id)}' exists but was not created by this proxy",
                service_id=service.id, hint="Remove or rename that container; the proxy never touches it")
        status = existing.attrs.get("State", {}).get("Status")
        if status in ("running", "restarting", "paused"):
            raise AlreadyRunning(f"Container '{service.id}' is already running", service_id=service.id)
        if status == "created" and _age_seconds(existing.attrs.get("Created")) < _START_IN_PROGRESS_SECONDS:
            raise AlreadyRunning(f"Container '{service.id}' is already starting", service_id=service.id)
        logger.info("removing old {} container {} before starting anew", status, existing.short_id)
        self._remove_quietly(existing)

    def _create(self, service: ServiceConfig):
        kwargs = dict(
            image=service.image,
            command=list(service.args) or None,
            name=self.name(service.id),
            labels=self.labels(service),
            ports={f"{service.container_port}/tcp": ("127.0.0.1", service.port)},
            volumes=[f"{v.host_path}:{v.container_path}:{v.mode}" for v in service.volumes],
            environment=dict(service.environment),
            device_requests=device_requests(service.resources.gpus),
            detach=True,
        )
        if service.resources.memory:
            kwargs["mem_limit"] = service.resources.memory
        if service.resources.cpus:
            kwargs["nano_cpus"] = int(service.resources.cpus * 1e9)
        if service.resources.shm_size:
            kwargs["shm_size"] = service.resources.shm_size
        try:
            return self.client.containers.create(**kwargs)
        except docker.errors.ImageNotFound:
            self._pull(service)
            return self.client.containers.create(**kwargs)

    def _pull(self, service: ServiceConfig) -> None:
        logger.info("image {} not found locally; pulling it", service.image)
        try:
            self.client.images.pull(service.image)
        except docker.errors.APIError as exc:
            message = _explanation(exc)
            logger.error("pulling image {} failed: {}", service.image, message)
            raise StartFailed(f"Image '{service.image}' is not on this Docker host and pulling it failed: {message}",
                              service_id=service.id, code="image_unavailable",
                              hint=hint_for("no such image", service)) from None

    def _start_failed(self, service: ServiceConfig, exc: docker.errors.APIError, step: str) -> StartFailed:
        message = _explanation(exc)
        logger.error("container {} failed to {}: {}", self.name(service.id), step, message)
        return StartFailed(f"Docker could not {step} the container for '{service.id}': {message}",
                           service_id=service.id, hint=hint_for(message, service))

    def _remove_quietly(self, container) -> None:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            logger.error("could not remove container {}: {}", container.short_id, exc)

    def stop(self, service: ServiceConfig) -> tuple[ContainerInfo, int | None]:
        """Stop (SIGTERM, then SIGKILL after stop_timeout) and remove the container.

        Returns:
            The container's info before stopping, and its exit code (None if it was not
            running, in which case nothing is done).
        """
        container = self._get(service.id)
        if container is None or not self._is_ours(container):
            return ContainerInfo(service_id=service.id, status="not found"), None
        info = self.info(container, service.id)
        if not info.running and info.status not in ("restarting", "paused"):
            return info, None
        try:
            self._call(lambda: container.stop(timeout=int(service.stop_timeout)), service)
            result = self._call(lambda: container.wait(timeout=_DOCKER_TIMEOUT), service)
            self._call(lambda: container.remove(force=True), service)
        except docker.errors.NotFound:
            return info, None  # removed under us: stopped all the same
        except docker.errors.APIError as exc:
            logger.error("container {} failed to stop: {}", self.name(service.id), _explanation(exc))
            raise StopFailed(f"Docker could not stop the container for '{service.id}': {_explanation(exc)}",
                             service_id=service.id, hint="Try again, or stop it with the docker CLI") from None
        exit_code = result.get("StatusCode")
        logger.info("container {} stopped and removed (exit code {})", self.name(service.id), exit_code)
        return info, exit_code


def _explanation(exc: docker.errors.APIError) -> str:
    message = exc.explanation or str(exc)
    return message.decode(errors="replace") if isinstance(message, bytes) else message


def _check_volume_sources(service: ServiceConfig) -> None:
    # dockerd would silently create a missing source as an empty folder, and the model
    # server would then fail later with a far less helpful message.
    for volume in service.volumes:
        if not os.path.exists(volume.host_path):
            raise StartFailed(f"Bind-mount source '{volume.host_path}' does not exist",
                              service_id=service.id, code="volume_missing",
                              hint=f"Create it, or fix services.{service.id}.volumes")


def _docker_time(value: str | None) -> str | None:
    if not value or value.startswith("0001-01-01"):
        return None  # Docker's zero time: never started
    return value


def docker_epoch(value: str | None) -> float | None:
    """A Docker timestamp such as 2026-11-23T23:40:01.123456789Z as seconds since the epoch."""
    try:
        seconds, _, _ = (value or "").rstrip("Z").partition(".")  # nanoseconds are beyond Python
        return datetime.fromisoformat(seconds).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def _age_seconds(created: str | None) -> float:
    stamp = docker_epoch(created)
    return float("inf") if stamp is None else time.time() - stamp
