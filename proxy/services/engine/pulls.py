"""Pulling a service's image through Docker's streaming pull, with its progress.

Docker reports a pull as a stream of messages, one or more per layer: "Pulling fs layer",
"Waiting", "Already exists", "Downloading" (with progressDetail current/total, the
compressed bytes), "Verifying Checksum", "Download complete", "Extracting", "Pull complete";
an "error" message ends a pull that failed after it began. ``PullProgress`` folds them into
a few numbers (pure: tested on its own).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import docker
import docker.errors
import requests
import urllib3.exceptions
from docker.utils import parse_repository_tag
from loguru import logger

from ...config import ServiceConfig
from ...errors import DockerUnavailable, StartFailed
from .spec import explanation, pull_hint

_DONE = frozenset({"pull complete", "already exists"})
_DOWNLOADED = frozenset({"verifying checksum", "download complete", "extracting", "pull complete"})


class Progress(NamedTuple):
    layers_done: int
    layers_total: int
    bytes_done: int
    bytes_total: int

    def as_dict(self) -> dict:
        """As status answers give it: ``percent`` is null until a total is known."""
        percent = round(min(100.0, 100.0 * self.bytes_done / self.bytes_total), 1) if self.bytes_total else None
        return {**self._asdict(), "percent": percent}


@dataclass
class _Layer:
    downloaded: int = 0
    total: int = 0
    done: bool = False


@dataclass
class PullProgress:
    """Docker's pull messages folded into layers and bytes."""

    layers: dict[str, _Layer] = field(default_factory=dict)

    def update(self, message: dict) -> bool:
        """Take one message; True when the counts changed."""
        layer_id, status = message.get("id"), (message.get("status") or "").lower()
        if not layer_id or not status or status.startswith("pulling from"):
            return False  # the image's own lines ("Pulling from ...", "Digest: ...", "Status: ...")
        before = self.counts()
        layer = self.layers.setdefault(layer_id, _Layer())
        detail = message.get("progressDetail") or {}
        if status == "downloading" and detail.get("total"):
            layer.total = int(detail["total"])
            layer.downloaded = min(int(detail.get("current") or 0), layer.total)
        elif status in _DOWNLOADED and layer.total:
            layer.downloaded = layer.total
        if status in _DONE:
            layer.done = True
        return self.counts() != before

    def counts(self) -> Progress:
        layers = self.layers.values()
        return Progress(sum(layer.done for layer in layers), len(self.layers),
                        sum(layer.downloaded for layer in layers), sum(layer.total for layer in layers))


def pull_image(client: docker.DockerClient, service: ServiceConfig, on_progress: Callable[[Progress], None],
               keep_going: Callable[[], bool]) -> bool:
    """Pull the service's image (with its ``registry_auth``), calling ``on_progress`` on the
    first message and whenever the counts change. False when ``keep_going`` said to stop
    (the pull is abandoned and its stream closed).

    Raises:
        StartFailed: code image_unavailable, with the registry's message (unknown image or
            tag, registry unreachable, credentials refused).
        DockerUnavailable: the engine cannot be reached.
    """
    repository, tag = parse_repository_tag(service.image)
    auth = service.registry_auth
    credentials = {"username": auth.username, "password": auth.password} if auth is not None else None
    progress = PullProgress()
    logger.info("pulling image {} for {}", service.image, service.id)
    try:
        stream = client.api.pull(repository, tag or "latest", stream=True, decode=True, auth_config=credentials)
        try:
            for index, message in enumerate(stream):
                if message.get("error"):
                    raise _Refused((message.get("errorDetail") or {}).get("message") or message["error"])
                if progress.update(message) or index == 0:
                    on_progress(progress.counts())
                if not keep_going():
                    logger.info("pull of image {} for {} abandoned", service.image, service.id)
                    return False
        finally:
            stream.close()  # also the engine connection, when the pull is abandoned
    except (docker.errors.DockerException, _Refused) as exc:  # first: APIError is a requests error too
        message = explanation(exc)
        logger.error("pulling image {} failed: {}", service.image, message)
        raise StartFailed(f"Image '{service.image}' is not on this Docker host and pulling it failed: {message}",
                          service_id=service.id, code="image_unavailable",
                          hint=pull_hint(message, service)) from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        logger.error("Docker engine unreachable while pulling {}: {}", service.image, exc)
        raise DockerUnavailable("The Docker engine is not reachable", service_id=service.id,
                                hint="Start dockerd, or point DOCKER_HOST at a running engine") from None
    done = progress.counts()
    logger.info("pulled image {} for {} ({} layers, {} bytes)", service.image, service.id, done.layers_total,
                done.bytes_done)
    return True


class _Refused(Exception):
    """The pull stream ended with Docker's error message."""

