"""Bring the containers in line with a reloaded config, disturbing as little as possible:
only what the change touches is drained, stopped or made anew, through the lifecycle owner."""
from __future__ import annotations

from loguru import logger

from ..config import Config
from ..config.diff import ConfigChange
from ..errors import ProxyError
from .lifecycle import Lifecycle
from .states import READY, STARTING, STOPPED

_RUNNING = (READY, STARTING)


def reconcile(lifecycle: Lifecycle, old: Config, new: Config, change: ConfigChange) -> None:
    """Removed services are drained and stopped; running ones whose container changed are
    drained and started again with the new config; an exclusive group left with several
    running members keeps the one used last. Everything else stays as it is."""
    for service_id in change.removed:
        service = old.services[service_id]
        if lifecycle.status(service, probe_health=False).state != STOPPED:
            _step("stopping removed service", service_id, lambda: lifecycle.stop(service, drain=True))
    for service_id in change.restarted:
        before, after = old.services[service_id], new.services[service_id]
        # Asked of the old config: a service moved to another engine runs on the old one.
        if lifecycle.status(before, probe_health=False).state in _RUNNING:
            _step("restarting changed service", service_id,
                  lambda: (lifecycle.stop(before, drain=True), lifecycle.start(after)))
    for group in new.groups.values():
        if group.exclusive:
            _one_running(lifecycle, new, group.name)


def _one_running(lifecycle: Lifecycle, config: Config, group: str) -> None:
    running = [s for s in config.services.values()
               if s.group == group and lifecycle.status(s, probe_health=False).state in _RUNNING]
    if len(running) < 2:
        return
    running.sort(key=lambda s: lifecycle.coordinator.last_activity(s.id), reverse=True)
    for service in running[1:]:  # idle longest first to go; the one used last stays
        _step(f"stopping a second running member of exclusive group {group}:", service.id,
              lambda: lifecycle.stop(service, drain=True))


def _step(what: str, service_id: str, action) -> None:
    logger.info("reload: {} {}", what, service_id)
    try:
        action()
    except ProxyError as exc:  # one service's trouble must not keep the others from the new config
        logger.warning("reload: {} {} failed: {}", what, service_id, exc.message)
