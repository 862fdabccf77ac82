"""Per-process runtime: the parts one worker needs, made lazily after gevent patched it."""
from __future__ import annotations

import gevent

from .config import Config
from .metrics import families as metrics
from .forwarding.inbound import BufferBudget
from .forwarding.upstream import UpstreamPool
from .services.engines import Engines
from .services.feed import EventFeed
from .services.idle import IdleSweep
from .services.lifecycle import Lifecycle
from .shared.coordinator import for_services


class Runtime:
    """The config, the Docker side, the upstream pool and the lifecycle owner of one
    worker process."""

    def __init__(self, config: Config, docker_client=None):
        self.config = config
        self.engines = Engines(config.server.container_prefix, config.engines, local_client=docker_client)
        self.upstream = UpstreamPool()
        self.buffered = BufferBudget(config.server.max_buffered)  # the front door's JSON bodies
        # Shared by every worker when gunicorn.conf.py installed it before forking.
        self.coordinator = for_services(list(config.services), list(config.groups))
        self.lifecycle = Lifecycle(config, None, None, self.coordinator, self.upstream, engines=self.engines)
        self.idle = IdleSweep(self.lifecycle)
        self.feed = EventFeed(self.lifecycle)  # GET /api/v1/events; its watcher runs only while subscribed

    @property
    def containers(self):
        """This host's engine (``local``)."""
        return self.engines.get("local").containers

    @property
    def states(self):
        return self.engines.get("local").states

    def service_state(self, service_id: str) -> str:
        """The lifecycle state, as every answer reports it (no Docker call)."""
        return self.lifecycle.status(self.config.services[service_id], probe_health=False).state

    def reconfigure(self, config: Config) -> None:
        """Serve a reloaded config from the next request on (containers are the reload's)."""
        self.config = config
        self.lifecycle.config = config
        self.engines.reconfigure(config.engines)
        self.coordinator.register(list(config.services), list(config.groups))
        self.buffered.limit = config.server.max_buffered

    def start(self) -> None:
        self.engines.start()
        self.idle.start()
        self._flusher = gevent.spawn(metrics.keep_flushing)

    def close(self) -> None:
        """Stop the background loops and close the pooled connections (a worker exiting)."""
        self._flusher.kill(block=False)
        metrics.flush()  # the last counts of this worker
        self.feed.close()
        self.idle.stop()
        self.engines.stop()
        self.upstream.close()
