"""Image pulls as a stage of a start, against a real registry (tests/registry.py): Debian's
docker-registry on 127.0.0.1, behind a relay that slows its answers down so that progress
shows, and counts the manifest requests (one per pull of a tag).

Each test pushes an image no Docker host has yet (the test image plus a layer of random
bytes) and removes it locally, so a start must pull it; what a test pulled is removed
afterwards.
"""
from __future__ import annotations

import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import free_port, service_entry, wait_until
from engine_api import api, error_of, start_ready, status
from feed_client import FeedReader
from metrics_scrape import scrape, value
from registry import Registry, RegistryRelay, push_fresh_image
from sse import assert_complete

pytestmark = pytest.mark.engine

MB = 1 << 20


@pytest.fixture(scope="session")
def registry(tmp_path_factory, docker_client):
    """The registry for the whole session, started and stopped by its PID."""
    started = Registry(tmp_path_factory.mktemp("registry"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def slow_registry(registry):
    relay = RegistryRelay(registry.port)
    yield relay
    relay.stop()


@pytest.fixture
def fresh_image(registry, slow_registry, docker_client, container_prefix):
    """Factory: push an image of ``size_mb`` random megabytes more than the test image, and
    give its reference through the relay; answers at ``rate`` bytes a second meanwhile."""
    references = []

    def make(size_mb: int = 8, rate: float | None = 2 * MB, tag: str | None = None) -> tuple[str, str]:
        _, tag, image_id = push_fresh_image(docker_client, registry, size_mb, tag)
        slow_registry.rate = rate
        reference = f"{slow_registry.host}/ipt/backend:{tag}"
        references.append(reference)
        return reference, image_id

    yield make
    slow_registry.rate = None
    for found in docker_client.api.containers(all=True, filters={"label": f"io.inference-proxy.instance={container_prefix}"}):
        docker_client.api.remove_container(found["Id"], force=True)  # before the images they use
    for reference in set(references):
        try:
            docker_client.images.remove(reference, force=True)
        except Exception:  # noqa: BLE001 - never pulled (a failed or refused start)
            pass


def _pulled_service(reference: str, **overrides) -> dict:
    return service_entry(free_port(), image=reference, **overrides)


def _progress_while_pulling(proxy, service_id: str) -> list[dict]:
    """Every progress a status answer gave, polled until the service is no longer pulling."""
    seen = []
    while True:
        current = status(proxy, service_id)
        if current["state"] != "pulling":
            return seen
        assert current["progress"] is not None, current
        seen.append(current["progress"])
        time.sleep(0.3)


def test_a_missing_image_is_pulled_with_progress_while_another_service_keeps_streaming(engine_proxy, fresh_image):
    reference, image_id = fresh_image(size_mb=16, rate=2 * MB)  # about 8 s of pulling
    proxy = engine_proxy({"other": service_entry(free_port()), "third": service_entry(free_port()),
                          "pulled": _pulled_service(reference)}, workers=2)
    start_ready(proxy, "other")
    feed = FeedReader(proxy)
    feed.snapshot  # noqa: B018 - subscribed
    gaps: list[float] = []
    streaming = threading.Event()

    def stream() -> dict:
        result = {"seqs": [], "done": False, "status": None, "error": None, "clean_end": True}
        last = None
        with requests.get(f"{proxy.url}/service/other/stream", params={"events": 100, "delay": 0.1}, stream=True,
                          timeout=60) as answer:
            result["status"] = answer.status_code
            for line in answer.iter_lines():
                if line.startswith(b"data: {"):
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    result["seqs"].append(len(result["seqs"]))
                    streaming.set()
                elif line == b"data: [DONE]":
                    result["done"] = True
        return result

    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(stream)  # 10 s of events from the running service
        assert streaming.wait(10)
        asked = time.monotonic()
        answer = api(proxy, "POST", "/service/pulled/start")
        assert answer.status_code == 202 and time.monotonic() - asked < 2, answer.text  # at once
        assert answer.json()["state"] == "pulling", answer.text
        during = scrape(proxy)
        assert value(during, "inference_proxy_service_state", service="pulled", state="pulling") == 1
        asked = time.monotonic()
        start_ready(proxy, "third")  # another start and stop meanwhile, at their usual pace
        assert api(proxy, "POST", "/service/third/stop").status_code == 200
        assert time.monotonic() - asked < 5
        assert status(proxy, "pulled")["state"] == "pulling"
        progress = _progress_while_pulling(proxy, "pulled")
        assert_complete(other.result(), 100)
    assert max(gaps) < 1.0, f"the pull held the other service's stream up for {max(gaps):.2f} s"
    done = [entry["bytes_done"] for entry in progress]
    assert len(set(done)) >= 3 and done == sorted(done), progress  # seen moving, never back
    assert all(entry["bytes_total"] >= 16 * MB and entry["layers_total"] >= 1 for entry in progress[1:]), progress
    assert all(entry["percent"] is None or 0 <= entry["percent"] <= 100 for entry in progress), progress
    wait_until(lambda: status(proxy, "pulled")["state"] == "ready", timeout=30, what="the pulled service ready")
    assert requests.get(f"{proxy.url}/service/pulled/v1/models", timeout=10).status_code == 200
    assert status(proxy, "pulled")["image"] == reference and status(proxy, "pulled")["progress"] is None

    pulling = [(at, data) for at, data in feed.of("pulled") if data["state"] == "pulling"]
    assert len(pulling) >= 3, feed.of("pulled")
    sizes = [data["progress"]["bytes_done"] for _, data in pulling]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    assert all(later - earlier >= 0.9 for (earlier, _), (later, _) in zip(pulling, pulling[1:])), \
        "progress events came more often than once a second"
    states = [data["state"] for _, data in feed.of("pulled")]
    assert states.index("pulling") < states.index("starting") < states.index("ready"), states
    after = scrape(proxy)
    assert value(after, "inference_proxy_start_duration_seconds_count", service="pulled", stage="pull") == 1
    assert value(after, "inference_proxy_start_duration_seconds_count", service="other", stage="pull") == 0
    feed.close()


def test_a_stop_during_a_pull_abandons_the_start(engine_proxy, fresh_image, docker_client, container_prefix):
    reference, _ = fresh_image(size_mb=16, rate=2 * MB)
    proxy = engine_proxy({"pulled": _pulled_service(reference)})
    assert api(proxy, "POST", "/service/pulled/start").json()["state"] == "pulling"
    time.sleep(1)
    asked = time.monotonic()
    stopped = api(proxy, "POST", "/service/pulled/stop")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped", stopped.text
    assert time.monotonic() - asked < 2
    time.sleep(10)  # past the time the pull would have taken
    assert status(proxy, "pulled")["state"] == "stopped"
    assert docker_client.containers.list(all=True, filters={"label": f"io.inference-proxy.instance={container_prefix}"}) == []
    assert "pull of image" in proxy.log() and "abandoned" in proxy.log()


def test_wait_covers_the_pull_and_the_load(engine_proxy, fresh_image):
    quick, _ = fresh_image(size_mb=8, rate=4 * MB)
    slow, _ = fresh_image(size_mb=8, rate=2 * MB)
    loading = ["--host", "0.0.0.0", "--port", "8080", "--load-seconds", "2"]
    proxy = engine_proxy({"quick": _pulled_service(quick, args=loading), "slow": _pulled_service(slow)})
    asked = time.monotonic()
    answer = api(proxy, "POST", "/service/quick/start", params={"wait": "true", "timeout": 60})
    assert answer.status_code == 200 and answer.json()["state"] == "ready", answer.text
    assert time.monotonic() - asked > 2 + 1  # the load after a pull of about 2 s
    timed_out = error_of(api(proxy, "POST", "/service/slow/start", params={"wait": "true", "timeout": 1}), 504,
                         "start_timeout", "slow")
    assert timed_out["last_status"]["state"] == "pulling" and timed_out["last_status"]["progress"] is not None
    wait_until(lambda: status(proxy, "slow")["state"] == "ready", timeout=60, what="the start to go on to ready")


def test_pull_policy_never_fails_at_once_and_always_pulls_again(engine_proxy, fresh_image, slow_registry,
                                                                docker_client, container_prefix):
    absent, _ = fresh_image(size_mb=1, rate=None)
    first, first_id = fresh_image(size_mb=1, rate=None)
    tag = first.rsplit(":", 1)[1]
    proxy = engine_proxy({"never": _pulled_service(absent, pull_policy="never"),
                          "always": _pulled_service(first, pull_policy="always")})
    asked = time.monotonic()
    error = error_of(api(proxy, "POST", "/service/never/start"), 500, "image_unavailable", "never")
    assert time.monotonic() - asked < 2 and "pull_policy is never" in error["message"]
    assert (status(proxy, "never")["state"], status(proxy, "never")["reason"]) == ("failed", "image_unavailable")
    assert slow_registry.manifest_requests(absent.rsplit(":", 1)[1]) == 0

    assert start_ready(proxy, "always")["image"] == first
    assert docker_client.containers.get(f"{container_prefix}-always").image.id == first_id
    api(proxy, "POST", "/service/always/stop")
    _, second_id = fresh_image(size_mb=1, rate=None, tag=tag)  # the same tag, a new image
    start_ready(proxy, "always")
    assert docker_client.containers.get(f"{container_prefix}-always").image.id == second_id  # it follows the registry
    assert slow_registry.manifest_requests(tag) == 2


def test_a_failed_pull_is_failed_image_unavailable_with_the_registrys_message(engine_proxy, slow_registry):
    missing_tag = f"{slow_registry.host}/ipt/backend:no-such-tag-{uuid.uuid4().hex[:8]}"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{closed.getsockname()[1]}/ipt/backend:any"  # nothing listens there
    proxy = engine_proxy({"unknown": _pulled_service(missing_tag), "unreachable": _pulled_service(nowhere)})
    error = error_of(api(proxy, "POST", "/service/unknown/start", params={"wait": "true"}), 500, "image_unavailable")
    assert "manifest unknown" in error["message"] and "could not be pulled" in error["hint"], error
    assert (status(proxy, "unknown")["state"], status(proxy, "unknown")["reason"]) == ("failed", "image_unavailable")
    error = error_of(api(proxy, "POST", "/service/unreachable/start", params={"wait": "true"}), 500,
                     "image_unavailable")
    assert "connection refused" in error["message"], error
    assert status(proxy, "unreachable")["reason"] == "image_unavailable"


def test_ten_concurrent_starts_from_two_workers_make_one_pull(engine_proxy, fresh_image, slow_registry):
    reference, _ = fresh_image(size_mb=8, rate=4 * MB)
    proxy = engine_proxy({"pulled": _pulled_service(reference)}, workers=2)

    def start(_) -> int:
        with requests.Session() as fresh:  # a new connection each: either worker
            return fresh.post(f"{proxy.url}/api/v1/service/pulled/start", headers={"Connection": "close"},
                              timeout=30).status_code

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(start, range(10)))
    assert set(answers) <= {202, 409} and 202 in answers, answers
    wait_until(lambda: status(proxy, "pulled")["state"] == "ready", timeout=60, what="the service ready")
    assert slow_registry.manifest_requests(reference.rsplit(":", 1)[1]) == 1
    assert proxy.log().count("pulling image") == 1


def test_a_waiting_stream_shows_the_pull_progress_then_loading(engine_proxy, fresh_image):
    reference, _ = fresh_image(size_mb=12, rate=2 * MB)  # about 6 s of pulling
    loading = ["--host", "0.0.0.0", "--port", "8080", "--load-seconds", "4"]
    proxy = engine_proxy({"llm": _pulled_service(reference, args=loading, autostart=True)})
    comments, events = [], []
    with requests.post(f"{proxy.url}/v1/chat/completions", stream=True, timeout=120,
                       json={"model": "llm", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith(b":"):
                comments.append(line.decode())
            elif line.startswith(b"data: "):
                events.append(line)
    pulling = [index for index, comment in enumerate(comments) if comment.startswith(f": pulling {reference} ")]
    assert pulling, comments
    assert any(comment.endswith(" MB)") and "% (" in comment for comment in comments), comments
    assert comments[pulling[-1] + 1:] and all(comment == ": loading" for comment in comments[pulling[-1] + 1:]), \
        comments
    assert all(comments[index].startswith(": pulling") for index in range(pulling[0], pulling[-1] + 1)), comments
    assert events and events[-1] == b"data: [DONE]"


def test_registry_credentials_are_used_and_never_shown(engine_proxy, docker_client, container_prefix,
                                                      tmp_path_factory, tmp_path):
    password = f"pw-{uuid.uuid4().hex[:16]}"
    locked = Registry(tmp_path_factory.mktemp("locked-registry"), users={"ipt": password})
    tag = None
    try:
        _, tag, _ = push_fresh_image(docker_client, locked, 1, auth={"username": "ipt", "password": password})
        reference = f"{locked.host}/ipt/backend:{tag}"
        proxy = engine_proxy({
            "with": _pulled_service(reference, registry_auth={"username": "ipt", "password": "${IPT_REGISTRY_PW}"}),
            "without": _pulled_service(reference)}, env={"IPT_REGISTRY_PW": password})
        refused = error_of(api(proxy, "POST", "/service/without/start", params={"wait": "true"}), 500,
                           "image_unavailable")
        assert "registry_auth" in refused["hint"], refused
        answer = start_ready(proxy, "with")
        assert answer["image"] == reference
        shown = api(proxy, "GET", "/services").text + api(proxy, "GET", "/openapi.json").text
        assert password not in shown and password not in proxy.log()
    finally:
        for found in docker_client.api.containers(all=True,
                                                  filters={"label": f"io.inference-proxy.instance={container_prefix}"}):
            docker_client.api.remove_container(found["Id"], force=True)
        try:
            docker_client.images.remove(f"{locked.host}/ipt/backend:{tag}", force=True)
        except Exception:  # noqa: BLE001 - not pulled
            pass
        locked.stop()
