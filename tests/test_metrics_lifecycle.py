"""The lifecycle's families on the real Docker engine: starts on demand, their stages, an
exclusive group's swap, an idle stop, each service's state and the engine's, counted once
across two workers."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import free_port, service_entry, wait_until
from metrics_scrape import chat, scrape, value

pytestmark = pytest.mark.engine

STATES = ("stopped", "starting", "ready", "stopping", "failed", "pulling")


def on_demand(**overrides) -> dict:
    # metrics_path off: the shared test image may predate the stand-in's /metrics.
    return service_entry(free_port(), autostart=True, start_timeout=60, group="gpu", metrics_path=None, **overrides)


def state_of(samples: dict, service_id: str) -> list[str]:
    return [state for state in STATES if value(samples, "inference_proxy_service_state",
                                               service=service_id, state=state) == 1]


def test_starts_a_swap_and_an_idle_stop_are_counted_once(engine_proxy):
    proxy = engine_proxy({"first": on_demand(), "second": on_demand(idle_timeout="3s")}, workers=2,
                         groups={"gpu": {"exclusive": True}}, log_level="INFO")
    def both_stopped():
        samples = scrape(proxy)
        return value(samples, "inference_proxy_docker_engine_up") == 1 and \
            state_of(samples, "first") == state_of(samples, "second") == ["stopped"]
    for _ in range(4):  # whichever worker answers
        wait_until(both_stopped, timeout=15, what="the engine up and both services stopped")

    # Requests at once, so both workers start `first`, and one of them joins the other's start.
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: chat(f"{proxy.url}/v1/chat/completions", model="first"), range(16)))
    samples = scrape(proxy)
    assert value(samples, "inference_proxy_container_starts_total", service="first", outcome="ready") == 1
    assert value(samples, "inference_proxy_start_duration_seconds_count", service="first", stage="create") == 1
    assert value(samples, "inference_proxy_start_duration_seconds_count", service="first", stage="ready") == 1
    assert value(samples, "inference_proxy_start_duration_seconds_count", service="first", stage="pull") == 0
    wait_until(lambda: state_of(scrape(proxy), "first") == ["ready"], timeout=5, what="`first` ready")

    chat(f"{proxy.url}/v1/chat/completions", model="second")  # stops `first` to make room
    samples = scrape(proxy)
    assert value(samples, "inference_proxy_swaps_total", group="gpu") == 1
    assert value(samples, "inference_proxy_container_starts_total", service="second", outcome="ready") == 1
    # Each worker learns of the swap from Docker's events, within milliseconds.
    def swapped():
        samples = scrape(proxy)
        return (state_of(samples, "first"), state_of(samples, "second")) == (["stopped"], ["ready"])
    wait_until(swapped, timeout=5, what="the swap seen")

    wait_until(lambda: value(scrape(proxy), "inference_proxy_idle_stops_total", service="second") == 1,
               timeout=30, what="the idle stop of `second` counted")
    wait_until(lambda: state_of(scrape(proxy), "second") == ["stopped"], timeout=5, what="`second` stopped")
    samples = scrape(proxy)
    assert value(samples, "inference_proxy_idle_stops_total", service="first") == 0
    for service_id in ("first", "second"):  # two workers, one start each
        assert value(samples, "inference_proxy_container_starts_total", service=service_id, outcome="ready") == 1
        for outcome in ("exited", "timeout", "failed"):
            assert value(samples, "inference_proxy_container_starts_total", service=service_id, outcome=outcome) == 0
    assert value(samples, "inference_proxy_swaps_total", group="gpu") == 1
