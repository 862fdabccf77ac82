"""Per-process runtime: the parts one worker needs, made lazily after gevent patched it."""
from __future__ import annotations

from .config import Config
from .services.containers import Containers
from .shared.coordinator import for_services
from .services.lifecycle import Lifecycle
from .services.container_states import ServiceStates
from .forwarding.upstream import UpstreamPool

# The service states the metrics report, from Docker's status as the events stream sees it.
_STATE_OF_STATUS = {"running": "ready", "created": "starting", "restarting": "starting",
                    "removing": "stopping", "exited": "failed", "dead": "failed", "not found": "stopped"}


class Runtime:
    """Holds the config, the Docker side, the upstream pool and the on-demand lifecycle of
    one worker process."""

    def __init__(self, config: Config, docker_client=None):
        self.config = config
        self.containers = Containers(config.server.container_prefix, client=docker_client)
        self.states = ServiceStates(self.containers)
        self.upstream = UpstreamPool()
        # Shared by every worker when gunicorn.conf.py installed it before forking.
        self.coordinator = for_services(list(config.services), list(config.groups))
        self.lifecycle = Lifecycle(config, self.containers, self.states, self.coordinator, self.upstream)

    def service_state(self, service_id: str) -> str:
        """stopped, starting, ready, stopping or failed, for the metrics; "unknown" before
        the engine answered, and for a paused container."""
        status = self.states.state(service_id).status
        if status == "running" and self.lifecycle.stopping(service_id):
            return "stopping"  # an idle stop or a group swap is draining it
        return _STATE_OF_STATUS.get(status, "unknown")

    def start(self) -> None:
        self.states.start()
        self.lifecycle.start_idle_loop()

    def close(self) -> None:
        self.lifecycle.stop_idle_loop()
        self.states.stop()
        self.upstream.close()
