"""Services on two real Docker engines through one proxy: this machine's, and a second
dockerd in a network namespace of its own (tests/remote_host.py), reached only over
tcp://10.213.0.2:2376 with TLS, as another GPU box would be.

Each test has its own container prefix; its containers are removed from both engines
afterwards. Timing is asserted only loosely, with generous bounds.
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import docker
import pytest
import requests

import engines
import remote_host
from conftest import TEST_IMAGE, free_port, service_entry, skip_outside_ci, wait_until
from engine_api import api, error_of, start_ready, status
from sse import assert_complete, read_sse

pytestmark = pytest.mark.engine

ENGINE = "gpu2"
BACKEND_KEY = "far-backend-key-7f3a"


@pytest.fixture(scope="module")
def remote(docker_client, tmp_path_factory):
    """The second host, with the test image loaded (cached in its data root), for the module;
    its dockerd is stopped by PID and the namespace deleted at the end, even on failure."""
    missing = engines.missing_abilities() or (None if _has("nsenter") and _has("openssl") else
                                               "nsenter and openssl are needed")
    if missing:
        skip_outside_ci(f"a second host cannot be made here: {missing}")
    with engines.engine_lock(remote_host.REMOTE):
        try:
            host = remote_host.start(tmp_path_factory.mktemp("remote"))
            engines.remove_containers(host.local_socket, label="io.inference-proxy.managed=true")  # a killed run's
            engines.load_image(TEST_IMAGE, engines.MAIN_ENGINE, host.local_socket)
            yield host
        finally:
            remote_host.stop()


def _has(tool: str) -> bool:
    import shutil
    return shutil.which(tool) is not None


@pytest.fixture
def remote_client(remote):
    """The tests' own look at the remote engine (through its socket file, not the proxy's way)."""
    client = docker.DockerClient(base_url=remote.local_socket, timeout=30)
    yield client
    client.close()


@pytest.fixture
def two_host_proxy(engine_proxy, remote, container_prefix):
    """Factory: a proxy whose config has the remote engine as ``gpu2``."""
    def start(services: dict, **kwargs):
        return engine_proxy(services, engines={ENGINE: remote.engine_config()}, **kwargs)
    yield start
    engines.thaw(remote.pid)  # should a test have left it frozen
    engines.remove_containers(remote.local_socket, label=f"io.inference-proxy.instance={container_prefix}")


def _far(port: int | None = None, **overrides) -> dict:
    return service_entry(port or free_port(), engine=ENGINE, **overrides)


def _stream(proxy, service_id: str, events: int = 20, delay: float = 0.05) -> dict:
    return read_sse(f"{proxy.url}/service/{service_id}/stream", {"events": events, "delay": delay}, timeout=60)


def _ours(client, prefix: str) -> list:
    return client.containers.list(all=True, filters={"label": f"io.inference-proxy.instance={prefix}"})


def test_a_service_on_each_engine_streams_through_one_proxy(two_host_proxy, docker_client, remote_client,
                                                            container_prefix, remote):
    port = free_port()  # the same port on both hosts: each host has its own
    proxy = two_host_proxy({"near": service_entry(port), "far": _far(port)})
    start_ready(proxy, "near")
    far = start_ready(proxy, "far")
    assert (far["engine_name"], far["engine"], far["address"]) == (ENGINE, "reachable", remote.address), far
    assert status(proxy, "near")["engine_name"] == "local"

    [remote_container] = _ours(remote_client, container_prefix)  # made there, not here
    assert [c.name for c in _ours(docker_client, container_prefix)] == [f"{container_prefix}-near"]
    bindings = remote_container.attrs["HostConfig"]["PortBindings"]["8080/tcp"]
    assert bindings == [{"HostIp": remote.address, "HostPort": str(port)}]  # that address only

    with ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(_stream, proxy, service_id) for service_id in ("near", "far")]
        for stream in streams:
            assert_complete(stream.result(), 20)

    health = requests.get(f"{proxy.url}/healthz", timeout=10).json()
    assert health["engines"] == {"local": {"reachable": True, "remote": False},
                                 ENGINE: {"reachable": True, "remote": True}}, health
    models = {m["id"]: m["engine"] for m in requests.get(f"{proxy.url}/v1/models", timeout=10).json()["data"]}
    assert models == {"near": "local", "far": ENGINE}
    metrics = requests.get(f"{proxy.url}/metrics", timeout=10).text
    assert f'inference_proxy_docker_engine_up{{engine="{ENGINE}"}} 1.0' in metrics
    assert f'inference_proxy_service_engine_info{{engine="{ENGINE}",service="far"}} 1.0' in metrics


def test_a_backend_api_key_is_asked_for_by_the_backend_and_sent_by_the_proxy(two_host_proxy, remote):
    port = free_port()
    proxy = two_host_proxy({"far": _far(port, backend_api_key=BACKEND_KEY)})
    start_ready(proxy, "far")  # its health checks passed: /health is open, as in llama-server
    direct = f"http://{remote.address}:{port}/v1/models"
    assert requests.get(direct, timeout=10).status_code == 401  # the container got LLAMA_API_KEY
    assert requests.get(direct, headers={"Authorization": f"Bearer {BACKEND_KEY}"}, timeout=10).status_code == 200
    through = requests.get(f"{proxy.url}/service/far/v1/models", timeout=10,
                           headers={"Authorization": "Bearer the-clients-own"})  # replaced by the key
    assert through.status_code == 200, through.text
    assert_complete(_stream(proxy, "far"), 20)
    assert BACKEND_KEY not in proxy.log()


def test_a_remote_service_is_stopped_and_adopted_after_a_proxy_restart(two_host_proxy, remote_client,
                                                                      container_prefix):
    services = {"far": _far()}
    first = two_host_proxy(services)
    started = start_ready(first, "far")
    first.proc.terminate()
    first.proc.wait(30)
    second = two_host_proxy(services)
    adopted = wait_until(lambda: (s := status(second, "far"))["state"] == "ready" and s, timeout=20,
                         what="the remote container to be adopted")
    assert adopted["container_id"] == started["container_id"]  # the same container, not a new one
    assert_complete(_stream(second, "far"), 20)
    stopped = api(second, "POST", "/service/far/stop")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped", stopped.text
    assert _ours(remote_client, container_prefix) == []


def test_a_frozen_remote_engine_fails_only_its_own_services_fast_and_comes_back(two_host_proxy, remote):
    proxy = two_host_proxy({"near": service_entry(free_port()), "far": _far(), "far2": _far()})
    start_ready(proxy, "near")
    start_ready(proxy, "far")
    with engines.frozen(remote.pid, at_most=10) as thawed:
        frozen_at = time.monotonic()
        wait_until(lambda: status(proxy, "far")["engine"] == "unreachable", timeout=4,
                   what="the frozen engine to be found")
        assert time.monotonic() - frozen_at < 3.5
        began = time.monotonic()
        error_of(api(proxy, "POST", "/service/far2/start", timeout=10), 503, "docker_unavailable", "far2")
        assert time.monotonic() - began < 3
        assert status(proxy, "near")["engine"] == "reachable"
        # The local engine goes on as usual: stop, start, forward.
        assert api(proxy, "POST", "/service/near/stop", timeout=10).json()["state"] == "stopped"
        start_ready(proxy, "near")
        assert_complete(_stream(proxy, "near"), 20)
        assert not thawed.is_set(), "the test outlasted the watchdog: its timings mean nothing"
    wait_until(lambda: status(proxy, "far")["engine"] == "reachable", timeout=15, what="the engine to be back")
    start_ready(proxy, "far2")
    assert_complete(_stream(proxy, "far"), 20)


def test_an_exclusive_group_spanning_both_engines_runs_one_member_at_a_time(two_host_proxy, docker_client,
                                                                           remote_client, container_prefix):
    proxy = two_host_proxy({"a": service_entry(free_port(), group="gpus"), "b": _far(group="gpus")},
                           groups={"gpus": {"exclusive": True}})
    began = time.time()
    start_ready(proxy, "a")
    start_ready(proxy, "b")
    assert status(proxy, "a")["state"] == "stopped"
    start_ready(proxy, "a")
    assert status(proxy, "b")["state"] == "stopped"
    events = sorted(_events(docker_client, container_prefix, began) + _events(remote_client, container_prefix, began))
    running: set[str] = set()
    for _, service, action in events:
        if action == "start":
            running.add(service)
            assert running == {service}, events  # never both
        else:
            running.discard(service)


def _events(client, prefix: str, since: float) -> list[tuple[float, str, str]]:
    found = client.events(since=int(since) - 1, until=int(time.time()) + 1, decode=True,
                          filters={"type": "container", "label": f"io.inference-proxy.instance={prefix}"})
    return [(event["timeNano"] / 1e9, event["Actor"]["Attributes"]["io.inference-proxy.service"], event["Action"])
            for event in found if event.get("Action") in ("start", "die")]


def test_a_bind_source_missing_on_the_remote_host_is_refused_before_a_container_is_made(
        two_host_proxy, remote_client, container_prefix):
    missing = f"/nonexistent-{uuid.uuid4().hex[:8]}/models"
    proxy = two_host_proxy({"far": _far(volumes=[f"{missing}:/models:ro"])})
    answer = api(proxy, "POST", "/service/far/start", params={"wait": "true", "timeout": 60})
    error = error_of(answer, 500, "volume_missing", "far")
    assert ENGINE in error["message"] and missing in error["message"], error
    assert _ours(remote_client, container_prefix) == []


def test_a_reload_that_moves_a_service_to_another_engine_restarts_it_there(two_host_proxy, docker_client,
                                                                          remote_client, container_prefix):
    import yaml

    proxy = two_host_proxy({"llm": service_entry(free_port())})
    start_ready(proxy, "llm")
    config = yaml.safe_load(proxy.config_path.read_text())
    config["services"]["llm"]["engine"] = ENGINE
    proxy.config_path.write_text(yaml.safe_dump(config))
    assert api(proxy, "POST", "/reload").json()["changed"]["restarted"] == ["llm"]
    wait_until(lambda: (s := status(proxy, "llm"))["engine_name"] == ENGINE and s["state"] == "ready",
               timeout=30, what="the service to run on the other engine")
    wait_until(lambda: _ours(docker_client, container_prefix) == [], timeout=10, what="the old one to go")
    assert [c.status for c in _ours(remote_client, container_prefix)] == ["running"]
    assert_complete(_stream(proxy, "llm"), 20)
