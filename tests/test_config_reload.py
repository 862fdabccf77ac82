"""Changing the config without a restart, on the real engine with two workers: each change
is applied per service with the least disturbance, while a stream on an unchanged service
goes on; a broken file changes nothing.

Each test has its own container prefix; every container under it is removed afterwards.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from conftest import free_port, service_entry, wait_until
from engine_api import api, error_of, start_ready, status
from sse import assert_complete, read_sse

pytestmark = pytest.mark.engine

CLOSE = {"Connection": "close"}
STREAM_EVENTS, STREAM_DELAY = 40, 0.15  # 6 s on the unchanged service while the reload happens


def _config(proxy) -> dict:
    return yaml.safe_load(proxy.config_path.read_text())


def _write(proxy, config: dict) -> None:
    """Write the file as an editor would: a new file moved over the old one."""
    temporary = proxy.config_path.with_suffix(".new")
    temporary.write_text(yaml.safe_dump(config))
    os.replace(temporary, proxy.config_path)


def _on_fresh_connections(proxy, path: str, tries: int = 8) -> set[int]:
    """Status codes of GETs on fresh connections, which land on either worker."""
    codes = set()
    for _ in range(tries):
        with requests.Session() as fresh:
            codes.add(fresh.get(f"{proxy.url}{path}", headers=CLOSE, timeout=30).status_code)
    return codes


@pytest.fixture
def reloading_proxy(engine_proxy):
    """A two-worker proxy with a running service 'steady' that keeps a stream open while
    the test changes the config."""
    def start(services: dict, **kwargs):
        proxy = engine_proxy({"steady": service_entry(free_port()), **services}, workers=2, **kwargs)
        start_ready(proxy, "steady")
        return proxy
    return start


class _SteadyStream:
    """A stream on the unchanged service, across the reload."""

    def __init__(self, proxy):
        self._pool = ThreadPoolExecutor(1)
        started = threading.Event()
        self._result = self._pool.submit(read_sse, f"{proxy.url}/service/steady/stream",
                                         {"events": STREAM_EVENTS, "delay": STREAM_DELAY}, started.set, 60)
        assert started.wait(10)

    def completes(self) -> None:
        assert_complete(self._result.result(), STREAM_EVENTS)
        self._pool.shutdown()


def test_an_added_service_is_routable_at_once_and_starts_on_demand(reloading_proxy):
    proxy = reloading_proxy({})
    stream = _SteadyStream(proxy)
    config = _config(proxy)
    config["services"]["fresh"] = service_entry(free_port(), autostart=True, aliases=["fresh:latest"])
    _write(proxy, config)
    wait_until(lambda: _on_fresh_connections(proxy, "/api/v1/container/fresh") == {200}, timeout=5,
               what="every worker to know the new service")
    models = requests.get(f"{proxy.url}/v1/models", headers=CLOSE, timeout=10).json()["data"]
    assert {"fresh", "fresh:latest"} <= {m["id"] for m in models}
    answer = requests.post(f"{proxy.url}/v1/chat/completions", headers=CLOSE, timeout=60,
                           json={"model": "fresh:latest", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 3})
    assert answer.status_code == 200, answer.text  # started on demand
    stream.completes()
    assert status(proxy, "steady")["state"] == "ready"


def test_a_removed_service_is_404_and_its_container_is_drained_and_stopped(reloading_proxy, docker_client,
                                                                            container_prefix):
    proxy = reloading_proxy({"gone": service_entry(free_port(), drain_timeout=30)})
    start_ready(proxy, "gone")
    stream = _SteadyStream(proxy)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        draining = pool.submit(read_sse, f"{proxy.url}/service/gone/stream", {"events": 20, "delay": 0.1},
                               started.set, 60)
        assert started.wait(10)
        config = _config(proxy)
        del config["services"]["gone"]
        _write(proxy, config)
        wait_until(lambda: _on_fresh_connections(proxy, "/service/gone/health") == {404}, timeout=5,
                   what="every worker to answer 404 for the removed service")
        assert_complete(draining.result(), 20)  # its stream in flight finished first
    wait_until(lambda: not docker_client.containers.list(
        all=True, filters={"name": f"{container_prefix}-gone"}), timeout=30, what="its container to be removed")
    error_of(requests.get(f"{proxy.url}/service/gone/health", headers=CLOSE, timeout=10), 404, "service_not_found")
    stream.completes()


def test_changed_args_restart_a_running_service_with_the_new_config(reloading_proxy):
    proxy = reloading_proxy({"llm": service_entry(free_port())})
    before = start_ready(proxy, "llm")
    stream = _SteadyStream(proxy)
    config = _config(proxy)
    config["services"]["llm"]["args"] = ["--host", "0.0.0.0", "--port", "8080", "--tokens", "7"]
    _write(proxy, config)
    wait_until(lambda: (s := status(proxy, "llm"))["state"] == "ready" and s["container_id"] != before["container_id"],
               timeout=30, what="the service to run again in a new container")

    def every_worker_sees_it_fresh():
        seen = []
        for _ in range(8):
            with requests.Session() as fresh:
                seen.append(fresh.get(f"{proxy.url}/api/v1/container/llm", headers=CLOSE, timeout=10).json())
        return all(s["state"] == "ready" and s["stale"] is False for s in seen)
    wait_until(every_worker_sees_it_fresh, timeout=5, what="no worker to report it stale")
    stream.completes()
    assert status(proxy, "steady")["container_id"] is not None and status(proxy, "steady")["stale"] is False


def test_a_change_only_to_what_the_proxy_does_leaves_the_container_alone(reloading_proxy):
    proxy = reloading_proxy({"llm": service_entry(free_port(), autostart=True)})
    before = start_ready(proxy, "llm")
    stream = _SteadyStream(proxy)
    config = _config(proxy)
    config["services"]["llm"].update(idle_timeout="1h", aliases=["llm:new-name"])
    _write(proxy, config)

    def alias_works():
        answer = requests.post(f"{proxy.url}/v1/chat/completions", headers=CLOSE, timeout=30,
                               json={"model": "llm:new-name", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 2})
        return answer.status_code == 200
    wait_until(lambda: all(alias_works() for _ in range(4)), timeout=5, what="the new alias on every worker")
    time.sleep(2)  # a restart, had one been wrongly made, would show by now
    assert status(proxy, "llm")["container_id"] == before["container_id"]
    stream.completes()


def test_a_broken_file_changes_nothing_and_the_reload_api_lists_every_problem(reloading_proxy):
    proxy = reloading_proxy({})
    stream = _SteadyStream(proxy)
    config = _config(proxy)
    config["services"]["steady"]["port"] = "not-a-port"
    config["services"]["steady"]["typo_key"] = 1
    _write(proxy, config)
    time.sleep(2.5)  # the watch has seen it by now
    answer = api(proxy, "POST", "/reload")
    error = error_of(answer, 400, "config_invalid")
    assert any("services.steady.port" in problem for problem in error["problems"]), error
    assert any("services.steady.typo_key: Unknown field." in problem for problem in error["problems"]), error
    stream.completes()
    assert status(proxy, "steady")["state"] == "ready"
    assert "configuration reload rejected" in proxy.log()


def test_the_reload_api_applies_a_file_when_watching_is_off_and_says_what_changed(engine_proxy):
    proxy = engine_proxy({"steady": service_entry(free_port())}, workers=2, server_extra={"watch_config": False})
    config = _config(proxy)
    config["services"]["other"] = service_entry(free_port())
    config["services"]["steady"]["max_concurrent"] = 3
    _write(proxy, config)
    time.sleep(2.5)
    assert _on_fresh_connections(proxy, "/api/v1/container/other") == {404}  # not watched: not seen
    answer = api(proxy, "POST", "/reload")
    assert answer.status_code == 200, answer.text
    assert answer.json()["changed"]["added"] == ["other"] and answer.json()["changed"]["updated"] == ["steady"], answer.text
    wait_until(lambda: _on_fresh_connections(proxy, "/api/v1/container/other") == {200}, timeout=3,
               what="every worker to switch within 3 s")


def test_a_concurrency_limit_holds_across_a_reload(reloading_proxy):
    proxy = reloading_proxy({"limited": service_entry(free_port(), max_concurrent=1, max_queue=0)})
    start_ready(proxy, "limited")
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(read_sse, f"{proxy.url}/service/limited/stream", {"events": 40, "delay": 0.15},
                           started.set, 60)
        assert started.wait(10)
        config = _config(proxy)
        config["services"]["extra"] = service_entry(free_port())
        _write(proxy, config)
        wait_until(lambda: _on_fresh_connections(proxy, "/api/v1/container/extra") == {200}, timeout=5,
                   what="the reload")
        # The request in flight before the reload still counts after it, in every worker.
        assert _on_fresh_connections(proxy, "/service/limited/health") == {429}
        assert_complete(busy.result(), 40)


def test_the_event_feed_carries_a_reload_event_with_what_changed(engine_proxy):
    proxy = engine_proxy({"steady": service_entry(free_port())}, server_extra={"watch_config": False})
    with requests.get(f"{proxy.url}/api/v1/events", stream=True, timeout=30) as feed:
        lines = feed.iter_lines()
        assert next(lines) == b"event: snapshot"
        config = _config(proxy)
        config["services"]["fresh"] = service_entry(free_port())
        _write(proxy, config)
        assert api(proxy, "POST", "/reload").status_code == 200
        for line in lines:
            if line == b"event: reload":
                data = json.loads(next(lines).decode().removeprefix("data: "))
                break
    assert (data["added"], data["removed"], data["restarted"], data["updated"]) == (["fresh"], [], [], [])
