"""Which services' containers run, kept fresh from Docker's events stream.

The forwarding hot path asks ``ServiceStates.state(id)``: a dict lookup, no Docker call.
One background loop per worker lists our containers once, then follows Docker's events
for them, so a change made by anyone (the admin API in any worker, the docker CLI, a
crash) is seen within milliseconds. If the engine goes away the last known states are
kept (running containers stay reachable) and the loop reconnects by itself.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from loguru import logger

from .containers import ContainerInfo, Containers

_RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0)  # seconds; then every 2 s until the engine is back


@dataclass(frozen=True)
class ServiceState:
    status: str  # a Docker status, "not found", or "unknown" before the engine answered
    container: ContainerInfo | None = None

    @property
    def forwardable(self) -> bool:
        # With no word from Docker yet, try the backend rather than refuse: it may run.
        return self.status in ("running", "unknown")


_UNKNOWN = ServiceState("unknown")
_NOT_FOUND = ServiceState("not found")


class ServiceStates:
    """Per-process view of our containers' states, fed by Docker events."""

    def __init__(self, containers: Containers):
        self._containers = containers
        self._states: dict[str, ServiceState] = {}
        self._synced = False
        self.engine_reachable: bool | None = None  # None until the first attempt
        self._stopping = threading.Event()
        self._close_stream = None

    def state(self, service_id: str) -> ServiceState:
        found = self._states.get(service_id)
        if found is not None:
            return found
        return _NOT_FOUND if self._synced else _UNKNOWN

    def update(self, info: ContainerInfo) -> None:
        """Record what an action of ours just saw, ahead of its event."""
        self._states[info.service_id] = ServiceState(info.status, info)

    def start(self) -> None:
        # threading is gevent's under gunicorn's worker: this is then a greenlet.
        threading.Thread(target=self._run, name="docker-events", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        if self._close_stream is not None:
            try:
                self._close_stream()
            except Exception:  # noqa: BLE001 - closing a dead stream may fail any way it likes
                pass

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                self._follow()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any engine hiccup
                self._lost(exc)
                failures += 1
            self._stopping.wait(_RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)])

    def _follow(self) -> None:
        # Subscribe first, then list: a change between the two shows up as an event.
        event_ids, self._close_stream = self._containers.events()
        self._states = {sid: ServiceState(info.status, info)
                        for sid, info in self._containers.list_managed().items()}
        self._synced = True
        if self.engine_reachable is not True:
            logger.info("Docker engine reachable; following container events ({} managed containers)",
                        len(self._states))
        self.engine_reachable = True
        for container_id in event_ids:
            if self._stopping.is_set():
                return
            self._refresh(container_id)

    def _refresh(self, container_id: str) -> None:
        info = self._containers.inspect_id(container_id)
        if info is not None:
            self._states[info.service_id] = ServiceState(info.status, info)
            return
        for service_id, state in list(self._states.items()):  # destroyed: forget it
            if state.container and state.container.container_id == container_id:
                del self._states[service_id]

    def _lost(self, exc: Exception) -> None:
        if self._stopping.is_set():
            return
        if self.engine_reachable is not False:
            logger.warning("Docker engine not reachable ({}); keeping the last known states and retrying",
                           exc)
        self.engine_reachable = False
