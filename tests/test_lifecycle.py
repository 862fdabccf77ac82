"""One lifecycle owner, on the real engine: the admin API and requests share start, stop,
drain and swap, and every worker reports the same state.

Each test has its own container prefix; every container under it is removed afterwards.
Timing is asserted only loosely (order, completeness, generous bounds).
"""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import free_port, service_entry, wait_until
from engine_api import api, error_of, start_ready, status
from sse import assert_complete, read_sse

pytestmark = pytest.mark.engine

EXCLUSIVE = {"gpu0": {"exclusive": True}}
CLOSE = {"Connection": "close"}


def _stream(proxy, service_id: str, events: int, delay: float, started: threading.Event | None = None):
    return read_sse(f"{proxy.url}/service/{service_id}/stream", {"events": events, "delay": delay},
                    started.set if started is not None else None, timeout=60)


@contextlib.contextmanager
def _a_stop_draining_a_stream(proxy, events: int = 20):
    """Inside: the service is being stopped while a stream of it is in flight. After: the
    stop answered 200 and the stream arrived whole (it was drained, not cut)."""
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(_stream, proxy, "llm", events, 0.1, started)
        assert started.wait(10)
        stop = pool.submit(api, proxy, "POST", "/service/llm/stop")
        wait_until(lambda: status(proxy)["state"] == "stopping", timeout=5, what="the stop to begin")
        yield
        assert stop.result().status_code == 200
        assert_complete(stream.result(), events)


def _container_events(docker_client, prefix: str, since: float) -> list[tuple[float, str, str]]:
    """(time, service, action) of our containers' start and die events since then, in order."""
    found = docker_client.events(since=int(since) - 1, until=int(time.time()) + 1, decode=True,
                                 filters={"type": "container", "label": f"io.inference-proxy.instance={prefix}"})
    seen = [(event["timeNano"] / 1e9, event["Actor"]["Attributes"]["io.inference-proxy.service"], event["Action"])
            for event in found if event.get("Action") in ("start", "die")]
    return sorted(seen)


def test_an_admin_start_swaps_an_exclusive_group_after_the_running_member_finishes_its_stream(
        engine_proxy, docker_client, container_prefix):
    proxy = engine_proxy({"a": service_entry(free_port(), group="gpu0", drain_timeout=30),
                          "b": service_entry(free_port(), group="gpu0")}, groups=EXCLUSIVE)
    began = time.time()
    start_ready(proxy, "a")
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(_stream, proxy, "a", 30, 0.1, started)  # 3 s of events
        assert started.wait(10)
        answer = api(proxy, "POST", "/service/b/start")
        assert answer.status_code == 202, answer.text  # at once: the swap goes on in the background
        assert status(proxy, "a")["state"] == "stopping"
        assert status(proxy, "b")["state"] == "starting"
        assert_complete(stream.result(), 30)  # the running member's stream finished first
    wait_until(lambda: status(proxy, "b")["state"] == "ready", timeout=30, what="b to be ready")
    assert status(proxy, "a")["state"] == "stopped"
    events = _container_events(docker_client, container_prefix, began)
    a_died = [t for t, service, action in events if (service, action) == ("a", "die")]
    b_started = [t for t, service, action in events if (service, action) == ("b", "start")]
    assert a_died and b_started and a_died[0] < b_started[0], events  # never both running


def test_an_admin_stop_waits_for_the_stream_in_flight(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), drain_timeout=30)})
    start_ready(proxy)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(_stream, proxy, "llm", 20, 0.1, started)
        assert started.wait(10)
        answer = api(proxy, "POST", "/service/llm/stop")
        assert_complete(stream.result(), 20)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["state"], body["drained"], body["cut"]) == ("stopped", 1, 0), body


def test_an_admin_stop_without_drain_cuts_the_stream(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), drain_timeout=30)})
    start_ready(proxy)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(_stream, proxy, "llm", 200, 0.1, started)  # 20 s if not cut
        assert started.wait(10)
        answer = api(proxy, "POST", "/service/llm/stop", params={"drain": "false"})
        cut = stream.result()
    assert answer.status_code == 200 and (answer.json()["drained"], answer.json()["cut"]) == (0, 1), answer.text
    assert not cut["done"] and len(cut["seqs"]) < 200, cut


def test_a_request_that_comes_while_a_service_stops_waits_and_is_served_after_a_new_start(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), autostart=True, drain_timeout=30)})
    first = start_ready(proxy)
    with _a_stop_draining_a_stream(proxy):
        late = requests.get(f"{proxy.url}/service/llm/v1/models", headers=CLOSE, timeout=60)
    assert late.status_code == 200, late.text  # served by the container started after the stop
    again = status(proxy)
    assert again["state"] == "ready" and again["container_id"] != first["container_id"]


def test_a_request_for_a_service_being_stopped_without_autostart_is_503_service_stopping(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), drain_timeout=30)})
    start_ready(proxy)
    with _a_stop_draining_a_stream(proxy):
        error_of(requests.get(f"{proxy.url}/service/llm/v1/models", headers=CLOSE, timeout=10), 503,
                 "service_stopping", "llm")


def _states_seen(proxy, service_id: str = "llm", tries: int = 16) -> set[str]:
    """The state as answered on fresh connections, which land on either worker."""
    seen = set()
    for _ in range(tries):
        with requests.Session() as fresh:
            seen.add(fresh.get(f"{proxy.url}/api/v1/container/{service_id}", headers=CLOSE, timeout=10).json()["state"])
    return seen


def test_every_worker_reports_the_same_state_within_a_second(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), drain_timeout=30,
                                               args=["--host", "0.0.0.0", "--port", "8080", "--load-seconds", "3"])},
                         workers=2)
    assert _states_seen(proxy) == {"stopped"}
    assert api(proxy, "POST", "/service/llm/start").status_code == 202
    time.sleep(1)
    assert _states_seen(proxy) == {"starting"}  # loading: running, health not yet 200
    wait_until(lambda: status(proxy)["state"] == "ready", timeout=30, what="the service to be ready")
    time.sleep(1)
    assert _states_seen(proxy) == {"ready"}
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(_stream, proxy, "llm", 40, 0.1, started)
        assert started.wait(10)
        stop = pool.submit(api, proxy, "POST", "/service/llm/stop")
        time.sleep(1)
        assert _states_seen(proxy) == {"stopping"}
        assert stop.result().status_code == 200
        stream.result()
    time.sleep(1)
    assert _states_seen(proxy) == {"stopped"}


def test_a_start_of_a_stopping_service_waits_for_the_stop_then_starts(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), drain_timeout=30)})
    first = start_ready(proxy)
    with _a_stop_draining_a_stream(proxy):
        answer = api(proxy, "POST", "/service/llm/start", params={"wait": "true", "timeout": 60})
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "ready" and answer.json()["container_id"] != first["container_id"]
