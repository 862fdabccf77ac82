"""What a service's container looks like to Docker: its name, labels, config hash, the
arguments that create it, GPU device requests, and what we read back from Docker.

State lives in Docker, not in a worker: a managed container has a deterministic name
``<prefix>-<service id>`` (the name doubles as a lock, so concurrent starts make one
container) and labels that say it is ours, for which service, under which config.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from docker.types import DeviceRequest

from ...config import ServiceConfig
from ...errors import StartFailed

LABEL_MANAGED = "io.inference-proxy.managed"
LABEL_INSTANCE = "io.inference-proxy.instance"
LABEL_SERVICE = "io.inference-proxy.service"
LABEL_CONFIG_HASH = "io.inference-proxy.config-hash"

# What shapes the container; timeouts, health paths and body limits are the proxy's own
# business, so changing them does not make a running container stale.
_CONTAINER_FIELDS = ("type", "image", "port", "container_port", "args", "volumes", "environment", "resources")


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


def info_of(attrs: dict, service_id: str | None = None) -> ContainerInfo:
    """A ContainerInfo from Docker's inspect answer."""
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


def config_hash(service: ServiceConfig) -> str:
    """A short, stable digest of everything that shapes the container."""
    shaping = {name: value for name, value in service.to_dict().items() if name in _CONTAINER_FIELDS}
    encoded = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def labels(prefix: str, service: ServiceConfig) -> dict[str, str]:
    return {LABEL_MANAGED: "true", LABEL_INSTANCE: prefix, LABEL_SERVICE: service.id,
            LABEL_CONFIG_HASH: config_hash(service)}


def is_ours(container_labels: dict | None, prefix: str) -> bool:
    found = container_labels or {}
    return found.get(LABEL_MANAGED) == "true" and found.get(LABEL_INSTANCE) == prefix


def device_requests(gpus) -> list[DeviceRequest]:
    """The ``resources.gpus`` forms as NVIDIA device requests: all, a count, or ids."""
    if gpus is None:
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if isinstance(gpus, int):
        return [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
    return [DeviceRequest(device_ids=list(gpus), capabilities=[["gpu"]])]


def create_arguments(prefix: str, service: ServiceConfig) -> dict:
    """docker-py's ``containers.create`` keyword arguments for the service."""
    kwargs = dict(
        image=service.image,
        command=list(service.args) or None,
        name=f"{prefix}-{service.id}",
        labels=labels(prefix, service),
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
    return kwargs


def check_volume_sources(service: ServiceConfig) -> None:
    # dockerd would silently create a missing source as an empty folder, and the model
    # server would then fail later with a far less helpful message.
    for volume in service.volumes:
        if not os.path.exists(volume.host_path):
            raise StartFailed(f"Bind-mount source '{volume.host_path}' does not exist",
                              service_id=service.id, code="volume_missing",
                              hint=f"Create it, or fix services.{service.id}.volumes")


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


def pull_hint(message: str, service: ServiceConfig) -> str:
    """A plain next step after a failed pull: the credentials, or the image itself."""
    text = message.lower()
    if "unauthorized" in text or "authentication required" in text or "no basic auth credentials" in text:
        return (f"The registry refused to serve image '{service.image}' without valid credentials: set or fix "
                f"services.{service.id}.registry_auth")
    return hint_for("no such image", service)


def explanation(exc: BaseException) -> str:
    """Docker's own words for an error."""
    message = getattr(exc, "explanation", None) or str(exc)
    return message.decode(errors="replace") if isinstance(message, bytes) else message


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


def age_seconds(created: str | None) -> float:
    stamp = docker_epoch(created)
    return float("inf") if stamp is None else time.time() - stamp
