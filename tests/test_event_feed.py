"""The live event feed (GET /api/v1/events) under real gunicorn with two workers, on the
real engine: a snapshot, then every change, whoever made it, within a second.

"Within a second" is measured against what made the change: an answer of the admin API,
the first status answer that shows it, or Docker's own event time (the host's clock, as
the test's).
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import free_port, service_entry, wait_until
from docker_relay import DockerRelay
from engine_api import api, start_ready, status
from feed_client import FeedReader, connect, connection_to_another_worker, rss_kb, worker_of, worker_pids
from sse import assert_complete, read_sse

SECOND = 1.0  # the promise
LOADING = ["--host", "0.0.0.0", "--port", "8080", "--load-seconds", "2"]


def _docker_time(docker_client, prefix: str, service_id: str, action: str, since: float) -> float:
    """When Docker says the service's container did ``action`` (the first time since then)."""
    found = docker_client.events(since=int(since) - 1, until=int(time.time()) + 1, decode=True,
                                 filters={"type": "container", "label": f"io.inference-proxy.instance={prefix}"})
    for event in found:
        if event.get("Action") == action and event["Actor"]["Attributes"]["io.inference-proxy.service"] == service_id:
            return event["timeNano"] / 1e9
    raise AssertionError(f"Docker reported no {action} of {service_id}")


def _without_repeats(states: list[str]) -> list[str]:
    return [state for index, state in enumerate(states) if index == 0 or states[index - 1] != state]


def _ready_seen_at(proxy, service_id: str, timeout: float = 30) -> float:
    """When a status answer first says ready."""
    wait_until(lambda: status(proxy, service_id)["state"] == "ready", timeout=timeout, interval=0.05,
               what=f"{service_id} to be ready")
    return time.time()


@pytest.mark.engine
def test_a_subscriber_gets_the_snapshot_then_a_start_made_on_another_worker_within_a_second(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), args=LOADING)}, workers=2)
    connection = connect(proxy)
    subscriber_worker = worker_of(proxy, connection)
    feed = FeedReader(proxy, connection)
    assert feed.snapshot == requests.get(f"{proxy.url}/api/v1/services", timeout=10).json()
    assert feed.snapshot["services"][0]["state"] == "stopped"

    other = connection_to_another_worker(proxy, subscriber_worker)
    other.request("POST", "/api/v1/service/llm/start")
    answer = other.getresponse()
    answered = time.time()
    assert answer.status == 202, answer.read()
    starting_at, starting = feed.wait_for("llm", "starting", timeout=5)
    assert starting_at <= answered + SECOND
    assert starting["progress"] is None and starting["reason"] is None and starting["time"].endswith("Z")
    ready_at = _ready_seen_at(proxy, "llm")
    event_at, ready = feed.wait_for("llm", "ready", timeout=5)
    assert event_at <= ready_at + SECOND, (event_at, ready_at)
    assert ready["status"] == "running" and "exit_code" not in ready
    assert _without_repeats(feed.states("llm")) == ["starting", "ready"]
    feed.close()


@pytest.mark.engine
def test_an_idle_stop_is_seen_within_a_second(engine_proxy, docker_client, container_prefix):
    proxy = engine_proxy({"llm": service_entry(free_port(), idle_timeout=2)}, workers=2)
    start_ready(proxy)
    began = time.time()
    feed = FeedReader(proxy)
    assert feed.snapshot["services"][0]["state"] == "ready"
    stopped_at, _ = feed.wait_for("llm", "stopped", timeout=15)
    removed = _docker_time(docker_client, container_prefix, "llm", "destroy", began)
    assert stopped_at <= removed + SECOND, (stopped_at, removed)
    assert _without_repeats(feed.states("llm")) in (["stopping", "stopped"], ["stopped"])
    feed.close()


@pytest.mark.engine
def test_a_group_swap_is_seen_in_order_within_a_second(engine_proxy, docker_client, container_prefix):
    proxy = engine_proxy({"a": service_entry(free_port(), group="gpu0", drain_timeout=30),
                          "b": service_entry(free_port(), group="gpu0", args=LOADING)},
                         groups={"gpu0": {"exclusive": True}}, workers=2)
    start_ready(proxy, "a")
    began = time.time()
    feed = FeedReader(proxy)
    assert [s["state"] for s in feed.snapshot["services"]] == ["ready", "stopped"]
    streaming = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(read_sse, f"{proxy.url}/service/a/stream", {"events": 20, "delay": 0.1},
                             streaming.set, 60)  # 2 s of events: a drains
        assert streaming.wait(10)
        answer = api(proxy, "POST", "/service/b/start")
        answered = time.time()
        assert answer.status_code == 202, answer.text
        stopping_at, _ = feed.wait_for("a", "stopping", timeout=5)
        assert stopping_at <= answered + SECOND
        assert_complete(stream.result(), 20)
    a_stopped_at, _ = feed.wait_for("a", "stopped", timeout=30)
    a_removed = _docker_time(docker_client, container_prefix, "a", "destroy", began)
    assert a_stopped_at <= a_removed + SECOND, (a_stopped_at, a_removed)
    b_ready = _ready_seen_at(proxy, "b")
    b_ready_at, _ = feed.wait_for("b", "ready", timeout=5)
    assert b_ready_at <= b_ready + SECOND, (b_ready_at, b_ready)
    assert _without_repeats(feed.states("a")) == ["stopping", "stopped"]
    assert _without_repeats(feed.states("b")) == ["starting", "ready"]
    assert a_stopped_at <= b_ready_at  # never both running
    feed.close()


@pytest.mark.engine
def test_a_container_stopped_with_the_docker_cli_is_seen_within_a_second(engine_proxy, docker_client,
                                                                         container_prefix):
    proxy = engine_proxy(workers=2)
    start_ready(proxy)
    began = time.time()
    feed = FeedReader(proxy)
    assert feed.snapshot["services"][0]["state"] == "ready"
    subprocess.run(["docker", "stop", "--time", "5", f"{container_prefix}-llm"], check=True, capture_output=True)
    failed_at, failed = feed.wait_for("llm", "failed", timeout=10)
    died = _docker_time(docker_client, container_prefix, "llm", "die", began)
    assert failed_at <= died + SECOND, (failed_at, died)
    assert (failed["status"], failed["reason"], failed["exit_code"], failed["oom_killed"]) == \
        ("exited", "container_exited", 0, False), failed
    assert _without_repeats(feed.states("llm")) == ["failed"]
    feed.close()


# -- what subscribers cost ---------------------------------------------------------------------

MISSING_VOLUME = ["/nonexistent-inference-proxy-test/models:/models:ro"]


def _hold_a_feed_unread(proxy) -> socket.socket:
    """A subscriber that sends its request and never reads (a small receive buffer, so the
    kernel holds little for it)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    sock.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def _read_to_the_end(sock: socket.socket, timeout: float) -> tuple[int, bool]:
    """(bytes read, whether the proxy ended the connection) within the timeout."""
    sock.settimeout(timeout)
    total = 0
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return total, True
            total += len(data)
    except ConnectionResetError:
        return total, True
    except socket.timeout:
        return total, False


@pytest.mark.engine
def test_a_subscriber_that_never_reads_is_dropped_and_the_others_get_every_event(engine_proxy):
    # Starts that fail at once (a missing bind-mount source) and stops of nothing: many
    # state changes quickly, without a container.
    ids = [f"s{index:02d}" for index in range(24)]
    proxy = engine_proxy({service_id: service_entry(free_port(), volumes=MISSING_VOLUME) for service_id in ids},
                         workers=2)
    stalled = _hold_a_feed_unread(proxy)
    reader = FeedReader(proxy)
    reader.snapshot  # noqa: B018 - subscribed
    workers = worker_pids(proxy)
    memory_before = sum(rss_kb(pid) for pid in workers)

    def each(path: str, expected: int) -> None:
        with requests.Session() as session:
            for service_id in ids:
                assert session.post(f"{proxy.url}/api/v1/service/{service_id}/{path}", timeout=10).status_code \
                    == expected
        time.sleep(0.6)  # longer than the feed's look at the services: each state is seen

    rounds = 0
    while "stopped reading" not in proxy.log() and rounds < 40:
        each("start", 500)
        each("stop", 200)
        rounds += 1
    assert "stopped reading" in proxy.log(), f"the stalled subscriber was never dropped after {rounds} rounds"
    each("start", 500)  # after the drop: the reader still gets everything
    each("stop", 200)
    rounds += 1

    def seen(service_id: str) -> list[str]:  # a stop may be caught in the act: "stopping" too
        return [state for state in reader.states(service_id) if state != "stopping"]

    def complete():
        return all(seen(service_id) == ["failed", "stopped"] * rounds for service_id in ids)
    try:
        wait_until(complete, timeout=10)
    except AssertionError:
        missing = {service_id: seen(service_id) for service_id in ids
                   if seen(service_id) != ["failed", "stopped"] * rounds}
        raise AssertionError(f"the reader missed events of {rounds} rounds: {missing}") from None
    assert all(data["reason"] == "volume_missing" for service_id in ids
               for _, data in reader.of(service_id) if data["state"] == "failed")
    received, ended = _read_to_the_end(stalled, timeout=10)
    assert ended, "the stalled subscriber's connection was kept open"
    assert received < sum(len(repr(data)) for _, _, data in reader.events) / 2  # it missed most of them
    grown_kb = sum(rss_kb(pid) for pid in workers) - memory_before
    assert grown_kb < 20 * 1024, f"the workers grew by {grown_kb} KiB"
    stalled.close()
    reader.close()


class _CountingRelay(DockerRelay):
    """The Docker API calls the proxy makes, less the heartbeat's pings."""

    def __init__(self, path: str):
        super().__init__(path)
        self.calls: list[bytes] = []

    def _from_proxy(self, data: bytes) -> None:
        super()._from_proxy(data)
        request_line = data.split(b"\r\n", 1)[0]
        if data[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE") and b"/_ping" not in request_line:
            self.calls.append(request_line)


def _subscribe_raw(proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    sock.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    received = b""
    while b"\n\n" not in received.partition(b"event: snapshot")[2]:  # the whole snapshot event
        data = sock.recv(65536)
        assert data, "the feed ended before its snapshot"
        received += data
    return sock


@pytest.mark.engine
def test_two_hundred_idle_subscribers_cost_no_docker_call(engine_proxy, container_prefix, tmp_path):
    relay = _CountingRelay(str(tmp_path / "docker.sock")).start()
    subscribers: list[socket.socket] = []
    try:
        proxy = engine_proxy(docker_host=relay.docker_host, workers=2)
        start_ready(proxy)
        time.sleep(1)
        before = len(relay.calls)
        with ThreadPoolExecutor(20) as pool:
            subscribers = list(pool.map(lambda _: _subscribe_raw(proxy), range(200)))
        time.sleep(3)  # idle: twelve looks at the services per worker
        assert relay.calls[before:] == [], "Docker calls made for idle subscribers"
        subprocess.run(["docker", "stop", "--time", "5", f"{container_prefix}-llm"], check=True,
                       capture_output=True)
        stopped = time.time()

        def sees_the_exit(sock: socket.socket) -> float:
            received = b""
            while b'"state":"failed"' not in received:
                data = sock.recv(65536)
                assert data, "a subscriber's feed ended"
                received += data
            return time.time()
        with ThreadPoolExecutor(20) as pool:
            seen = list(pool.map(sees_the_exit, subscribers))
        assert max(seen) - stopped < 3, "the exit reached every subscriber within about a second of docker stop"
    finally:
        for sock in subscribers:
            sock.close()
        relay.stop()


def test_a_subscriber_that_leaves_is_removed_at_once(start_proxy):
    proxy = start_proxy({"llm": service_entry(free_port())})
    sock = _subscribe_raw(proxy)
    assert "a subscriber came (1 now)" in proxy.log()
    sock.close()  # nothing is written to it meanwhile: only the watch on its socket can tell
    wait_until(lambda: "a subscriber left (0 now)" in proxy.log(), timeout=SECOND, what="the subscriber removed")


def test_the_feed_needs_the_admin_token_when_one_is_set(start_proxy):
    proxy = start_proxy({"llm": service_entry(free_port())}, server_extra={"admin_token": "feed-token-1234"})
    refused = requests.get(f"{proxy.url}/api/v1/events", timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    with requests.get(f"{proxy.url}/api/v1/events", headers={"Authorization": "Bearer feed-token-1234"},
                      stream=True, timeout=10) as answer:
        assert answer.status_code == 200
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        assert answer.headers["Cache-Control"] == "no-cache" and answer.headers["X-Accel-Buffering"] == "no"
        first = next(answer.iter_lines())
        assert first == b"event: snapshot"


def test_a_stopping_proxy_ends_its_feeds_cleanly_at_once(start_proxy):
    proxy = start_proxy({"llm": service_entry(free_port())}, env={"PROXY_GRACEFUL_TIMEOUT": "60"}, workers=2)
    feeds = [FeedReader(proxy) for _ in range(4)]
    for feed in feeds:
        feed.snapshot  # noqa: B018 - subscribed
    stopping = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.proc.wait(30)
    assert time.monotonic() - stopping < 5, "the feeds held the workers until the graceful timeout"
    wait_until(lambda: all(feed.ended for feed in feeds), timeout=5, what="every feed to end")
    assert [feed.ended for feed in feeds] == ["clean"] * 4


def test_a_reload_event_reaches_every_subscriber(monkeypatch):
    """publish_reload, called directly (the config reload calls it in each worker)."""
    from proxy import create_app
    from proxy.config import load_config_text
    from proxy.services.feed import publish_reload

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    config = load_config_text(f"services:\n  llm: {{type: llama-cpp-server, image: x, port: {free_port()}}}\n")
    app = create_app(config)
    try:
        client = app.test_client()
        streams = [iter(client.get("/api/v1/events", buffered=False).response) for _ in range(2)]
        for stream in streams:
            assert next(stream).startswith(b"event: snapshot\n")
        publish_reload(["new"], ["old"], ["llm"], [])
        for stream in streams:
            kind, data = next(stream).decode().splitlines()[:2]
            assert kind == "event: reload"
            body = json.loads(data[len("data: "):])
            assert (body["added"], body["removed"], body["restarted"], body["updated"]) == (["new"], ["old"],
                                                                                          ["llm"], [])
            assert body["time"].endswith("Z")
    finally:
        app.extensions["proxy"].close()


@pytest.mark.engine
def test_an_adopted_container_that_finishes_loading_is_seen_ready(engine_proxy, docker_client, container_prefix):
    """No start of the new proxy watches it: the feed's own probe marks it healthy."""
    services = {"llm": service_entry(free_port(), args=["--host", "0.0.0.0", "--port", "8080", "--load-seconds", "4"])}
    first = engine_proxy(services)
    assert api(first, "POST", "/service/llm/start").status_code == 202
    first.proc.kill()
    first.proc.wait(10)
    second = engine_proxy(services)
    feed = FeedReader(second)
    assert feed.snapshot["services"][0]["state"] == "starting"  # running, still loading
    ready_at, _ = feed.wait_for("llm", "ready", timeout=20)
    started = docker_client.containers.get(f"{container_prefix}-llm").attrs["State"]["StartedAt"]
    from proxy.services.engine import docker_epoch
    healthy_from = docker_epoch(started) + 4
    assert ready_at <= healthy_from + 2 * SECOND, (ready_at, healthy_from)  # probed once a second
    feed.close()
