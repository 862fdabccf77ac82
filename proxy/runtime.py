"""Per-process runtime: the parts one worker needs, made lazily after gevent patched it."""
from __future__ import annotations

from .config import Config
from .containers import Containers
from .state import ServiceStates
from .upstream import UpstreamPool


class Runtime:
    """Holds the config, the Docker side and the upstream pool of one worker process."""

    def __init__(self, config: Config, docker_client=None):
        self.config = config
        self.containers = Containers(config.server.container_prefix, client=docker_client)
        self.states = ServiceStates(self.containers)
        self.upstream = UpstreamPool()

    def start(self) -> None:
        self.states.start()

    def close(self) -> None:
        self.states.stop()
        self.upstream.close()
