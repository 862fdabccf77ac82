"""The families read when scraped, not recorded as things happen: requests in flight and
queued (from the coordinator all workers share, so every worker answers the same), each
service's state, whether the Docker engine answers, and the proxy's version."""
from __future__ import annotations

from prometheus_client.metrics_core import GaugeMetricFamily

from .. import __version__

SERVICE_STATES = ("stopped", "starting", "ready", "stopping", "failed", "pulling")


class ScrapeTimeCollector:
    """A prometheus_client collector over one worker's runtime."""

    def __init__(self, runtime):
        self._runtime = runtime

    def collect(self):
        runtime = self._runtime
        coordinator = runtime.coordinator
        in_flight = GaugeMetricFamily("inference_proxy_in_flight",
                                      "Requests being answered by a service now, across all workers.",
                                      labels=["service"])
        queued = GaugeMetricFamily("inference_proxy_queued",
                                   "Requests waiting for a slot under max_concurrent now, across all workers.",
                                   labels=["service"])
        states = GaugeMetricFamily("inference_proxy_service_state",
                                   "1 for the service's current state, 0 for the others.",
                                   labels=["service", "state"])
        for service_id in runtime.config.services:
            in_flight.add_metric([service_id], coordinator.in_flight(service_id))
            queued.add_metric([service_id], coordinator.waiting(service_id))
            current = runtime.service_state(service_id)
            for state in SERVICE_STATES:
                states.add_metric([service_id, state], 1 if state == current else 0)
        yield in_flight
        yield queued
        yield states
        yield GaugeMetricFamily("inference_proxy_docker_engine_up",
                                "1 while the Docker engine answers, 0 when it does not (or has not yet).",
                                value=1 if runtime.states.engine_reachable else 0)
        build = GaugeMetricFamily("inference_proxy_build_info", "The proxy's version (always 1).",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        yield build
