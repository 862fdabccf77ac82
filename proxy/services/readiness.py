"""Is a service ready: does it answer its ``health_path`` with 200? And waiting until it does."""
from __future__ import annotations

import time
from typing import Callable

import requests

from ..config import ServiceConfig
from .engine import ContainerInfo
from ..forwarding.upstream import UpstreamPool, backend_headers

_PROBE_TIMEOUT = (1.0, 2.0)  # connect, read: a health answer is quick or it is not ready
_POLL_INTERVAL = 0.25


def probe(pool: UpstreamPool, service: ServiceConfig) -> bool:
    url = f"http://{service.upstream_host}{service.health_path}"
    try:
        response = pool.send("GET", url, backend_headers(service), None, _PROBE_TIMEOUT)
    except (requests.RequestException, OSError):
        return False
    try:
        return response.status_code == 200
    finally:
        response.close()


def wait_ready(pool: UpstreamPool, service: ServiceConfig, inspect: Callable[[], ContainerInfo],
               timeout: float, abort: Callable[[], bool] = lambda: False) -> tuple[str, ContainerInfo]:
    """Poll until the service is ready, its container stops, the deadline passes, or
    ``abort`` says to give up (the service is being stopped meanwhile).

    Returns:
        ("ready" | "exited" | "timeout" | "aborted", the container's last info).
    """
    deadline = time.monotonic() + timeout
    info = inspect()
    while True:
        if abort():
            return "aborted", info
        if probe(pool, service):
            return "ready", info
        info = inspect()
        if not info.running and info.status not in ("created", "restarting"):
            return "exited", info
        if time.monotonic() >= deadline:
            return "timeout", info
        time.sleep(min(_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
