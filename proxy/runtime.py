"""Per-process runtime: the parts one worker needs, made lazily after gevent patched it."""
from __future__ import annotations

from .config import Config
from .forwarding.inbound import BufferBudget
from .forwarding.upstream import UpstreamPool
from .services.container_states import ContainerStates
from .services.engine import Containers
from .services.feed import EventFeed
from .services.idle import IdleSweep
from .services.lifecycle import Lifecycle
from .shared.coordinator import for_services

class Runtime:
    """The config, the Docker side, the upstream pool and the lifecycle owner of one
    worker process."""

    def __init__(self, config: Config, docker_client=None):
        self.config = config
        self.containers = Containers(config.server.container_prefix, client=docker_client)
        self.states = ContainerStates(self.containers)
        self.upstream = UpstreamPool()
        self.buffered = BufferBudget(config.server.max_buffered)  # the front door's JSON bodies
        # Shared by every worker when gunicorn.conf.py installed it before forking.
        self.coordinator = for_services(list(config.services), list(config.groups))
        self.lifecycle = Lifecycle(config, self.containers, self.states, self.coordinator, self.upstream)
        self.idle = IdleSweep(self.lifecycle)
        self.feed = EventFeed(self.lifecycle)  # GET /api/v1/events; its watcher runs only while subscribed

    def service_state(self, service_id: str) -> str:
        """The lifecycle state, as every answer reports it (no Docker call)."""
        return self.lifecycle.status(self.config.services[service_id], probe_health=False).state

    def start(self) -> None:
        self.states.start()
        self.idle.start()

    def close(self) -> None:
        """Stop the background loops and close the pooled connections (a worker exiting)."""
        self.feed.close()
        self.idle.stop()
        self.states.stop()
        self.upstream.close()
