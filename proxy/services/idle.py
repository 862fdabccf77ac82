"""Stop services that had no request for their ``idle_timeout``, so they give back their
GPU memory. Every worker sweeps; the coordinator's phase makes one of them do the stop."""
from __future__ import annotations

import time

import gevent
from loguru import logger

from ..config import ServiceConfig
from ..errors import ProxyError
from ..metrics.families import record_idle_stop
from .engine import docker_epoch
from .lifecycle import Lifecycle

_CHECK_EVERY = 1.0  # seconds between sweeps


class IdleSweep:
    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle
        self._loop = None

    def start(self) -> None:
        if any(s.idle_timeout for s in self.lifecycle.config.services.values()):
            self._loop = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.kill(block=False)

    def seconds_left(self, service: ServiceConfig) -> float | None:
        """Seconds before the service is stopped for being idle; None when it will not be
        (no idle_timeout, not running, or requests in flight)."""
        lifecycle = self.lifecycle
        info = lifecycle.states.get(service.id)
        if not service.idle_timeout or not info.running or lifecycle.coordinator.in_flight(service.id):
            return None
        started = docker_epoch(info.started_at) or 0.0
        last = max(lifecycle.coordinator.last_activity(service.id), started)
        return max(0.0, service.idle_timeout - (time.time() - last))

    def _run(self) -> None:
        while True:
            gevent.sleep(_CHECK_EVERY)
            for service in list(self.lifecycle.config.services.values()):
                try:
                    self._sweep(service)
                except ProxyError as exc:
                    logger.warning("idle stop of {} failed: {}", service.id, exc.message)
                except Exception:  # noqa: BLE001 - one error must not end the sweeps for good
                    logger.exception("idle stop of {} failed", service.id)

    def _sweep(self, service: ServiceConfig) -> None:
        if self.seconds_left(service) == 0.0:
            outcome = self.lifecycle.stop(service, drain=True, only_if_idle=True)
            if outcome.stopped:
                record_idle_stop(service.id)
                logger.info("stopped {}: idle for more than {:g} s", service.id, service.idle_timeout)
