"""A service's container log through the admin API (GET /api/v1/service/<id>/logs), on the
real engine with the test image: its tail, followed until it stops or the client leaves, a
crashed container's, and the configured secrets masked in it.

The test backend writes "LISTENING <port>" to stdout when it starts, and with -v a line per
request to stderr (the request line, so a test can write a marker into the log by asking
for /echo/<marker>).
"""
from __future__ import annotations

import re
import socket
import threading
import time
import uuid

import pytest
import requests

from conftest import free_port, recv_until, service_entry, wait_until
from docker_relay import DockerRelay
from engine_api import api, error_of, start_ready, status

VERBOSE = ["--host", "0.0.0.0", "--port", "8080", "-v"]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z ")


def _logs(proxy, service_id: str = "llm", **params) -> requests.Response:
    return requests.get(f"{proxy.url}/api/v1/service/{service_id}/logs", params=params, timeout=30)


def _mark(proxy, *markers: str) -> None:
    """Write each marker into the backend's log (its request line)."""
    for marker in markers:
        assert requests.get(f"{proxy.url}/service/llm/echo/{marker}", timeout=10).status_code == 200


def _marker_lines(text: str) -> list[str]:
    return re.findall(r"/echo/(m-[\w-]+)", text)


@pytest.mark.engine
def test_the_tail_of_a_containers_log_comes_as_docker_gives_it(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), args=VERBOSE)})
    start_ready(proxy)
    markers = [f"m-{index:02d}" for index in range(12)]
    _mark(proxy, *markers)
    answer = _logs(proxy, tail=5)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    lines = answer.text.splitlines()
    assert len(lines) == 5 and _marker_lines(answer.text) == markers[-5:], lines
    everything = _logs(proxy).text.splitlines()  # tail=200 by default: all of them here
    assert everything[0] == "LISTENING 8080"  # stdout, then the request lines from stderr
    assert _marker_lines("\n".join(everything)) == markers
    stamped = _logs(proxy, tail=3, timestamps="true").text.splitlines()
    assert len(stamped) == 3 and all(TIMESTAMP.match(line) for line in stamped), stamped
    time.sleep(2.5)
    _mark(proxy, "m-late")
    recent = _logs(proxy, since=1.5, tail="all").text
    assert _marker_lines(recent) == ["m-late"], recent


@pytest.mark.engine
def test_following_streams_new_lines_and_ends_cleanly_when_the_container_stops(engine_proxy, docker_client,
                                                                              container_prefix):
    proxy = engine_proxy({"llm": service_entry(free_port(), args=VERBOSE)})
    start_ready(proxy)
    seen: list[tuple[float, str]] = []
    outcome: dict = {}

    def follow() -> None:
        try:
            with requests.get(f"{proxy.url}/api/v1/service/llm/logs", params={"follow": "true", "tail": 0},
                              stream=True, timeout=30) as answer:
                outcome["status"] = answer.status_code
                for line in answer.iter_lines():
                    seen.append((time.time(), line.decode()))
            outcome["end"] = "clean"
        except requests.RequestException as exc:
            outcome["end"] = repr(exc)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(1)
    marked = time.time()
    _mark(proxy, "m-live")
    arrived = wait_until(lambda: next((at for at, line in seen if "/echo/m-live" in line), None), timeout=5,
                         what="the new line at the follower")
    assert arrived - marked < 1.0
    docker_client.containers.get(f"{container_prefix}-llm").stop(timeout=5)
    reader.join(10)
    assert not reader.is_alive(), "the follow did not end when the container stopped"
    assert outcome == {"status": 200, "end": "clean"}, outcome
    assert [line for _, line in seen if "LISTENING" in line] == []  # tail=0: nothing from before


@pytest.mark.engine
def test_a_client_leaving_a_follow_closes_the_docker_stream_within_a_second(engine_proxy, tmp_path):
    relay = DockerRelay(str(tmp_path / "docker.sock")).start()
    try:
        proxy = engine_proxy(docker_host=relay.docker_host)  # not verbose: silent once it listens
        start_ready(proxy)
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        client.sendall(b"GET /api/v1/service/llm/logs?follow=true&tail=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        recv_until(client, b"LISTENING 8080")  # the stream runs; the container is silent from now on
        (log_stream,) = [link for link in relay.connections
                         if any(b"/logs?" in line and b"follow=1" in line for line in link["requests"])]
        time.sleep(0.5)
        assert log_stream["open"]
        client.close()
        wait_until(lambda: not log_stream["open"], timeout=1.0,
                   what="the proxy to close its log stream to the engine")
        assert requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 200
    finally:
        relay.stop()


@pytest.mark.engine
def test_a_crashed_containers_log_stays_readable_until_its_next_start(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), args=VERBOSE)})
    start_ready(proxy)
    _mark(proxy, "m-before-crash")
    requests.post(f"{proxy.url}/service/llm/_crash", params={"code": 3}, timeout=10)
    wait_until(lambda: status(proxy)["state"] == "failed", timeout=10, what="the crash to be seen")
    answer = _logs(proxy)
    assert answer.status_code == 200
    assert _marker_lines(answer.text) == ["m-before-crash"] and "/_crash" in answer.text
    followed = requests.get(f"{proxy.url}/api/v1/service/llm/logs", params={"follow": "true"}, timeout=10)
    assert followed.status_code == 200 and "/_crash" in followed.text  # an exited container: it ends at once
    start_ready(proxy)
    assert _marker_lines(_logs(proxy).text) == []  # a new container, a new log


@pytest.mark.engine
def test_the_configured_secrets_are_masked_in_a_containers_log(engine_proxy, docker_client, container_prefix):
    secret = f"s3cret-{uuid.uuid4().hex[:12]}"
    # Python prints an invalid PYTHONWARNINGS entry at start-up, quoting it: the test backend
    # then prints the secret with no change to the image.
    proxy = engine_proxy({"llm": service_entry(free_port(), environment={"PYTHONWARNINGS": "${IPT_LOG_SECRET}"})},
                         env={"IPT_LOG_SECRET": secret}, server_extra={"admin_token": "admin-token-5678"})
    answer = api(proxy, "POST", "/service/llm/start", params={"wait": "true"},
                 headers={"Authorization": "Bearer admin-token-5678"})
    assert answer.status_code == 200, answer.text
    raw = docker_client.containers.get(f"{container_prefix}-llm").logs().decode()
    assert secret in raw  # the container did print it
    assert _logs(proxy).status_code == 401  # the admin token applies
    shown = requests.get(f"{proxy.url}/api/v1/service/llm/logs", headers={"Authorization": "Bearer admin-token-5678"},
                         timeout=10).text
    assert secret not in shown and "invalid action: '***'" in shown, shown


@pytest.mark.engine
def test_logs_of_a_service_without_a_container_are_404(engine_proxy):
    proxy = engine_proxy()
    error_of(_logs(proxy), 404, "no_container", "llm")
    error_of(_logs(proxy, "nope"), 404, "service_not_found", "nope")


def test_bad_log_parameters_are_400(start_proxy):
    proxy = start_proxy({"llm": service_entry(free_port())})
    for params in ({"tail": "-1"}, {"tail": "ten"}, {"tail": "1e3"}, {"since": "-5"}, {"since": "nan"},
                   {"since": "soon"}, {"follow": "maybe"}, {"timestamps": "2"}):
        error_of(_logs(proxy, **params), 400, "invalid_parameter")
