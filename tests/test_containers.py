"""Container lifecycle through the admin API, on the real Docker engine with the test image.

Each test gets its own container prefix; every container under it is force-removed
afterwards, even when the test fails (the ``container_prefix`` fixture).
"""
from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import time
import uuid

import openai
import pytest
import requests

from conftest import TEST_IMAGE, free_port, recv_until, service_entry, skip_outside_ci, wait_until
from docker_relay import DockerRelay
from engine_api import api, containers_of, error_of, start_ready, status

pytestmark = pytest.mark.engine


# -- UC-01 and UC-02 --------------------------------------------------------------------------

def test_start_status_ready_and_chat_through_the_proxy(engine_proxy, docker_client, container_prefix):
    proxy = engine_proxy()
    answer = api(proxy, "POST", "/service/llm/start")
    assert answer.status_code == 202
    body = answer.json()
    assert (body["message"], body["service_id"], body["state"]) == ("Container 'llm' starting", "llm", "starting")

    ready = wait_until(lambda: (s := status(proxy))["ready"] and s, timeout=30, what="the service to be ready")
    assert ready["status"] == "running" and ready["state"] == "ready" and ready["image"] == TEST_IMAGE
    assert ready["stale"] is False
    assert ready["container_id"] and ready["started_at"] and ready["exit_code"] is None

    client = openai.OpenAI(base_url=f"{proxy.url}/service/llm/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    completion = client.chat.completions.create(model="test-model", messages=messages, max_tokens=4)
    assert completion.choices[0].message.content.split() == ["tok0", "tok1", "tok2", "tok3"]
    streamed = client.chat.completions.create(model="test-model", messages=messages, max_tokens=6, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).split() == \
        [f"tok{i}" for i in range(6)]

    (container,) = containers_of(docker_client, container_prefix)
    assert container.name == f"{container_prefix}-llm"
    assert container.labels["io.inference-proxy.service"] == "llm"
    assert container.labels["io.inference-proxy.managed"] == "true"
    assert len(container.labels["io.inference-proxy.config-hash"]) == 16
    bindings = container.attrs["HostConfig"]["PortBindings"]["8080/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(ready["port"])}]


def test_stop_removes_the_container_and_the_proxy_answers_503(engine_proxy, docker_client, container_prefix):
    proxy = engine_proxy()
    start_ready(proxy)
    answer = api(proxy, "POST", "/service/llm/stop")
    assert answer.status_code == 200
    assert answer.json()["message"] == "Container 'llm' stopped" and answer.json()["exit_code"] == 0
    assert status(proxy)["status"] == "not found"
    assert containers_of(docker_client, container_prefix) == []
    error = error_of(requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10), 503, "service_not_running")
    assert error["service_id"] == "llm"

    again = api(proxy, "POST", "/service/llm/stop")
    assert again.status_code == 200
    assert again.json()["message"] == "Container 'llm' is not running" and again.json()["status"] == "not found"


def test_start_with_wait_returns_once_ready(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), args=["--host", "0.0.0.0", "--port", "8080",
                                                                    "--load-seconds", "2"])})
    body = start_ready(proxy)
    assert (body["state"], body["status"], body["ready"]) == ("ready", "running", True)
    assert requests.get(f"{proxy.url}/service/llm/health", timeout=10).status_code == 200


def test_start_twice_is_409_already_running(engine_proxy):
    proxy = engine_proxy()
    start_ready(proxy)
    error_of(api(proxy, "POST", "/service/llm/start"), 409, "already_running")


def test_wait_reports_a_container_that_exits_while_starting(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), args=["--port", "not-a-number"])})
    answer = api(proxy, "POST", "/service/llm/start", params={"wait": "true", "timeout": 30})
    error = error_of(answer, 500, "container_exited")
    assert error["exit_code"] == 2 and error["oom_killed"] is False
    assert any("argument --port: invalid int value" in line for line in error["logs"]), error["logs"]
    assert len(error["logs"]) <= 30
    reported = status(proxy)
    assert (reported["state"], reported["reason"], reported["exit_code"]) == ("failed", "container_exited", 2)


def test_wait_past_its_deadline_is_504_with_the_last_status(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), args=["--host", "0.0.0.0", "--port", "8080",
                                                                    "--load-seconds", "60"])})
    answer = api(proxy, "POST", "/service/llm/start", params={"wait": "true", "timeout": 1})
    error = error_of(answer, 504, "start_timeout")
    assert error["last_status"]["status"] == "running" and error["last_status"]["ready"] is False


@pytest.mark.parametrize("query", [{"wait": "maybe"}, {"wait": "true", "timeout": "-1"}, {"timeout": "abc"}])
def test_bad_start_parameters_are_400(engine_proxy, query):
    proxy = engine_proxy()
    error_of(api(proxy, "POST", "/service/llm/start", params=query), 400, "invalid_parameter")


@pytest.mark.parametrize("method,path", [("POST", "/service/nope/start"), ("POST", "/service/nope/stop"),
                                         ("GET", "/container/nope")])
def test_unknown_service_is_404(engine_proxy, method, path):
    error = error_of(api(engine_proxy(), method, path), 404, "service_not_found")
    assert error["service_id"] == "nope"


def test_services_lists_every_configured_service(engine_proxy):
    proxy = engine_proxy({"one": service_entry(free_port()), "two": service_entry(free_port())})
    api(proxy, "POST", "/service/one/start", params={"wait": "true", "timeout": 60})
    listed = {s["service_id"]: s for s in api(proxy, "GET", "/services").json()["services"]}
    assert listed["one"]["status"] == "running" and listed["one"]["ready"] is True
    assert listed["two"]["status"] == "not found" and listed["two"]["ready"] is None


# -- state kept fresh without a Docker call per request ---------------------------------------

def test_a_change_made_with_the_docker_cli_is_seen_at_once(engine_proxy, docker_client, container_prefix):
    proxy = engine_proxy()
    start_ready(proxy)
    assert requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 200
    docker_client.containers.get(f"{container_prefix}-llm").stop(timeout=5)
    wait_until(lambda: requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 503,
               timeout=1.0, what="503 within a second of the container stopping")


def test_forwarding_makes_no_docker_call_per_request(engine_proxy, tmp_path):
    relay = DockerRelay(str(tmp_path / "docker.sock")).start()
    try:
        proxy = engine_proxy(docker_host=relay.docker_host)
        start_ready(proxy)
        requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10)
        before = relay.requests_seen
        for _ in range(30):
            assert requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 200
        assert relay.requests_seen == before
    finally:
        relay.stop()


def test_all_workers_agree_on_what_runs(engine_proxy):
    proxy = engine_proxy(workers=2)
    start_ready(proxy)
    # New connections land on either worker; every one must see the container running.
    for _ in range(20):
        with requests.Session() as fresh:
            assert fresh.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 200
            assert fresh.get(f"{proxy.url}/api/v1/container/llm", timeout=10).json()["status"] == "running"
    api(proxy, "POST", "/service/llm/stop")
    for _ in range(20):
        with requests.Session() as fresh:
            assert fresh.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 503


# -- failures leave nothing behind ------------------------------------------------------------

def _assert_start_fails_cleanly(proxy, docker_client, prefix, code: str = "start_failed") -> dict:
    error = error_of(api(proxy, "POST", "/service/llm/start"), 500, code)
    assert error["hint"] and error["service_id"] == "llm"
    assert containers_of(docker_client, prefix) == [], "a failed start left a container holding the name"
    return error


def test_missing_image_fails_with_dockers_message(engine_proxy, docker_client, container_prefix):
    proxy = engine_proxy({"llm": service_entry(free_port(), image="inference-proxy-test-missing:none")})
    error = _assert_start_fails_cleanly(proxy, docker_client, container_prefix, code="image_unavailable")
    assert "'inference-proxy-test-missing:none' is not on this Docker host" in error["message"]
    assert "could not be pulled" in error["hint"]


def test_gpu_request_without_nvidia_runtime_says_so(engine_proxy, docker_client, container_prefix):
    if "nvidia" in docker_client.info().get("Runtimes", {}):
        skip_outside_ci("this engine has the NVIDIA runtime: the no-driver failure cannot happen here")
    proxy = engine_proxy({"llm": service_entry(free_port(), resources={"gpus": "all"})})
    error = _assert_start_fails_cleanly(proxy, docker_client, container_prefix)
    assert "could not select device driver" in error["message"]
    assert "NVIDIA" in error["hint"]


def test_taken_port_fails_with_a_plain_hint(engine_proxy, docker_client, container_prefix):
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        proxy = engine_proxy({"llm": service_entry(port)})
        error = _assert_start_fails_cleanly(proxy, docker_client, container_prefix)
    assert f"Host port {port}" in error["hint"]


def test_missing_bind_mount_source_is_refused_before_creating(engine_proxy, docker_client, container_prefix, tmp_path):
    missing = tmp_path / "no-such-models"
    proxy = engine_proxy({"llm": service_entry(free_port(), volumes=[f"{missing}:/models:ro"])})
    error = _assert_start_fails_cleanly(proxy, docker_client, container_prefix, code="volume_missing")
    assert str(missing) in error["message"]
    assert not missing.exists(), "dockerd must not have created the missing source"


def test_volumes_environment_and_resources_reach_the_container(engine_proxy, docker_client, container_prefix, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    proxy = engine_proxy({"llm": service_entry(free_port(), volumes=[f"{models}:/models:ro"],
                                               environment={"LLAMA_ARG_CTX_SIZE": 8192},
                                               resources={"memory": "256m", "cpus": 0.5, "shm_size": "64m"})})
    start_ready(proxy)
    attrs = docker_client.containers.get(f"{container_prefix}-llm").attrs
    assert f"{models}:/models:ro" in attrs["HostConfig"]["Binds"]
    assert "LLAMA_ARG_CTX_SIZE=8192" in attrs["Config"]["Env"]
    assert attrs["HostConfig"]["Memory"] == 256 * 1024 * 1024
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert attrs["HostConfig"]["ShmSize"] == 64 * 1024 * 1024
    assert attrs["Config"]["Cmd"] == ["--host", "0.0.0.0", "--port", "8080"]


def test_a_failed_start_of_one_service_leaves_another_running(engine_proxy):
    proxy = engine_proxy({"good": service_entry(free_port()),
                          "bad": service_entry(free_port(), image="inference-proxy-test-missing:none")})
    start_ready(proxy, "good")
    assert api(proxy, "POST", "/service/bad/start").status_code == 500
    assert status(proxy, "good")["status"] == "running"
    assert requests.get(f"{proxy.url}/service/good/v1/models", timeout=10).status_code == 200


# -- one container, whoever asks -------------------------------------------------------------

def test_twenty_concurrent_starts_make_one_container(engine_proxy, docker_client, container_prefix):
    proxy = engine_proxy(workers=2)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda _: api(proxy, "POST", "/service/llm/start").status_code, range(20)))
    assert set(codes) <= {200, 202, 409}, codes
    assert codes.count(202) == 1, codes
    assert len(containers_of(docker_client, container_prefix)) == 1


def test_a_restarted_proxy_adopts_its_running_containers(engine_proxy, docker_client, container_prefix):
    port = free_port()
    first = engine_proxy({"llm": service_entry(port)})
    started = start_ready(first)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    second = engine_proxy({"llm": service_entry(port)})
    adopted = status(second)
    assert adopted["status"] == "running" and adopted["container_id"] == started["container_id"]
    assert adopted["stale"] is False
    assert requests.get(f"{second.url}/service/llm/v1/models", timeout=10).status_code == 200
    assert api(second, "POST", "/service/llm/stop").status_code == 200
    assert containers_of(docker_client, container_prefix) == []


def test_a_container_from_another_config_is_reported_stale(engine_proxy):
    port = free_port()
    first = engine_proxy({"llm": service_entry(port)})
    start_ready(first)
    first.proc.send_signal(signal.SIGTERM)
    first.proc.wait(10)
    second = engine_proxy({"llm": service_entry(port, environment={"CHANGED": "yes"})})
    assert status(second)["stale"] is True


def test_a_foreign_container_holding_the_name_is_never_touched(engine_proxy, docker_client, container_prefix):
    foreign = docker_client.containers.run(TEST_IMAGE, name=f"{container_prefix}-llm", detach=True,
                                           labels={"io.inference-proxy.instance": container_prefix})
    try:
        proxy = engine_proxy()
        error = error_of(api(proxy, "POST", "/service/llm/start"), 409, "name_conflict")
        assert "not created by this proxy" in error["message"]
        assert api(proxy, "POST", "/service/llm/stop").json()["status"] == "not found"
        assert status(proxy)["status"] == "not found"
        foreign.reload()
        assert foreign.status == "running"
    finally:
        foreign.remove(force=True)


# -- the engine going away --------------------------------------------------------------------

def test_engine_outage_gives_503_keeps_forwarding_and_recovers(engine_proxy, tmp_path):
    relay = DockerRelay(str(tmp_path / "docker.sock")).start()
    try:
        proxy = engine_proxy(docker_host=relay.docker_host)
        start_ready(proxy)
        relay.stop()

        began = time.monotonic()
        last_known = wait_until(lambda: (s := status(proxy))["engine"] == "unreachable" and s, timeout=3,
                                what="the status to say the engine is unreachable")
        assert time.monotonic() - began < 3.0
        assert last_known["state"] == "ready" and last_known["status"] == "running"
        error_of(api(proxy, "POST", "/service/llm/stop"), 503, "docker_unavailable")
        assert requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 200

        relay.start()
        wait_until(lambda: status(proxy)["engine"] == "reachable", timeout=10, what="the engine to be back")
        assert api(proxy, "POST", "/service/llm/stop").status_code == 200
        wait_until(lambda: requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 503,
                   timeout=5, what="the stop to be seen through the renewed events stream")
    finally:
        relay.stop()


# -- GPUs -------------------------------------------------------------------------------------

def test_gpu_device_requests_reach_the_container_config(docker_client, container_prefix):
    from proxy.config import load_config_text
    from proxy.services.engine import Containers

    config = load_config_text(f"""
services:
  gpu:
    type: llama-cpp-server
    image: {TEST_IMAGE}
    port: {free_port()}
    resources: {{gpus: ["0", "2"]}}
""")
    containers = Containers(container_prefix, client=docker_client)
    created = containers._create(config.services["gpu"])  # create only: starting needs a GPU
    requests_ = created.attrs["HostConfig"]["DeviceRequests"]
    assert requests_ == [{"Driver": "", "Count": 0, "DeviceIDs": ["0", "2"], "Capabilities": [["gpu"]],
                          "Options": {}}]


# -- streaming through a real container -------------------------------------------------------

def test_sse_through_a_container_arrives_event_by_event(engine_proxy):
    proxy = engine_proxy()
    start_ready(proxy)
    response = requests.get(f"{proxy.url}/service/llm/stream", params={"events": 5, "delay": 0.3},
                            stream=True, timeout=30)
    arrivals, buffer = [], b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event != b"data: [DONE]":
                arrivals.append((json.loads(event[6:]), time.time()))
    assert [event["seq"] for event, _ in arrivals] == list(range(5))
    for (_, arrived), (following, _) in zip(arrivals, arrivals[1:]):
        assert arrived < following["sent_at"]  # here before the container sent the next one


def test_client_leaving_closes_the_container_upstream(engine_proxy):
    proxy = engine_proxy()
    start_ready(proxy)
    test_id = uuid.uuid4().hex
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(f"GET /service/llm/stream?events=1000&delay=0.2 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Test-Id: {test_id}\r\n\r\n"
                 .encode())
    recv_until(sock, b"data: ")
    sock.close()
    disconnects = wait_until(
        lambda: requests.get(f"{proxy.url}/service/llm/_disconnects", params={"test_id": test_id},
                             timeout=10).json()["disconnects"],
        timeout=3, what="the container's backend to see the client leave")
    assert disconnects[0]["phase"] == "mid_stream"
