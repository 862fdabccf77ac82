"""Which services' containers exist and run, kept fresh from Docker's events stream.

The forwarding hot path asks ``ContainerStates.get(id)``: a dict lookup, no Docker call.
One background loop per worker lists our containers once, then follows Docker's events
for them, so a change made by anyone (the admin API in any worker, the docker CLI, a
crash) is seen within milliseconds. A second loop pings the engine twice a second with a
short deadline (1.5 s): an engine that hangs rather than refuses (a stuck containerd) is
found within two seconds, and ``hung`` is set, so admin calls answer at once, and Docker
work under way gives up instead of waiting on it (``Lifecycle``).
While the engine is away the last known states are kept (running containers stay
reachable); when it answers again the events stream is opened afresh and the states
listed again, by themselves.
"""
from __future__ import annotations

import threading

import gevent
from gevent.event import Event
from loguru import logger

from ..errors import DockerUnavailable
from .engine import ContainerInfo, Containers

_RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0)  # seconds; then every 2 s until the engine is back
_PING_EVERY = 0.5      # seconds between heartbeats: a hang is found within this + the ping's deadline
_SUBSCRIBE_TIMEOUT = 10.0  # seconds for the engine to take up the events stream (the stream itself has none)
_UNKNOWN = "unknown"   # the status before the engine first answered


class ContainerStates:
    """Per-process view of our containers, fed by Docker events."""

    def __init__(self, containers: Containers):
        self._containers = containers
        self._infos: dict[str, ContainerInfo] = {}
        self._synced = False
        self.engine_reachable: bool | None = None  # None until the first attempt
        self.hung = Event()  # set while the engine leaves the heartbeat's pings unanswered
        self._stopping = threading.Event()
        self._close_stream = None
        self._stream_generation = 0  # bumped when the heartbeat asks for a fresh stream

    def get(self, service_id: str) -> ContainerInfo:
        """The last known info; status "not found", or "unknown" before the engine answered."""
        found = self._infos.get(service_id)
        if found is not None:
            return found
        return ContainerInfo(service_id=service_id, status="not found" if self._synced else _UNKNOWN)

    def update(self, info: ContainerInfo) -> None:
        """Record what an action of ours just saw, ahead of its event."""
        if info.status == "not found":
            self._infos.pop(info.service_id, None)
        else:
            self._infos[info.service_id] = info

    def start(self) -> None:
        # threading is gevent's under gunicorn's worker: these are then greenlets.
        threading.Thread(target=self._run, name="docker-events", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="docker-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        self._close()

    def _close(self) -> None:
        close, self._close_stream = self._close_stream, None
        if close is not None:
            try:
                close()
            except (OSError, ValueError, AttributeError):  # a dead stream may fail to close any way
                pass

    # -- the events stream ----------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                self._follow()
                failures = 0
            except DockerUnavailable as exc:
                self._lost(exc.message)
                failures += 1
            except Exception as exc:  # noqa: BLE001 - this loop must outlive anything one event does
                logger.exception("following Docker events failed; starting again")
                self._lost(str(exc))
                failures += 1
            self._stopping.wait(_RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)])

    def _follow(self) -> None:
        # Subscribe first, then list: a change between the two shows up as an event. A
        # subscription asked of an engine that went away can wait for ever (a connection lost
        # in a blackhole): ask again instead, so the stream comes back when the engine does.
        with gevent.Timeout(_SUBSCRIBE_TIMEOUT, DockerUnavailable("no answer to the events subscription")):
            event_ids, self._close_stream = self._containers.events()
        self._infos = dict(self._containers.list_managed())
        self._synced = True
        if self.engine_reachable is not True:
            logger.info("{} reachable; following container events ({} managed containers)",
                        getattr(self._containers, "label", "Docker engine"), len(self._infos))
        self.engine_reachable = True
        self.hung.clear()  # it answered: Docker work need not wait for the next ping to be let through
        for container_id in event_ids:
            if self._stopping.is_set():
                return
            self._refresh(container_id)

    def _refresh(self, container_id: str) -> None:
        info = self._containers.inspect_id(container_id)
        if info is not None:
            self._infos[info.service_id] = info
            return
        for service_id, known in list(self._infos.items()):  # destroyed: forget it
            if known.container_id == container_id:
                del self._infos[service_id]

    def _lost(self, why: str) -> None:
        if self._stopping.is_set():
            return
        if self.engine_reachable is not False:
            logger.warning("{} not reachable ({}); keeping the last known states and retrying",
                           getattr(self._containers, "label", "Docker engine"), why)
        self.engine_reachable = False

    # -- the heartbeat ----------------------------------------------------------------------

    def _heartbeat(self) -> None:
        while not self._stopping.is_set():  # the first ping at once: an engine away from the start is found early
            answered = self._ping()
            if answered:
                self.hung.clear()
            else:
                self.hung.set()
            if not answered and self.engine_reachable is not False:
                self._lost("no answer to a ping")
                self._close()  # the stream of a hung engine may never end by itself
            elif answered and self.engine_reachable is False:
                self._close()  # back: make the events loop open a fresh stream and list again
            self._stopping.wait(_PING_EVERY)

    def _ping(self) -> bool:
        try:
            return self._containers.ping()
        except Exception:  # noqa: BLE001 - the heartbeat must outlive anything one ping does: count it unanswered
            if not self.hung.is_set():
                logger.exception("pinging the Docker engine failed")
            return False
