"""An engine that hangs rather than refuses, and tcp:// engines that cannot be reached.

The hung engine is a real second dockerd (tests/engines.py) frozen with SIGSTOP: its API
accepts connections and answers nothing, while its containers and their userland proxies
go on. The contract: while the engine does not answer, every admin call answers within
3 s (status with the last known state marked "engine": "unreachable", start and stop 503
docker_unavailable naming the service), forwarding to running containers goes on, and when
the engine answers again everything recovers by itself, the events stream included.
"""
from __future__ import annotations

import concurrent.futures
import subprocess
import threading
import time
import uuid

import pytest
import requests

from conftest import free_port, service_entry, wait_until
from engine_api import error_of, start_ready
from engines import frozen
from tcp_blackhole import BlackholeRelay, SilentServer

ANSWER_WITHIN = 3.0  # seconds: the contract for every admin call while the engine does not answer


def timed(proxy, method: str, path: str, **kwargs) -> tuple[requests.Response | None, float]:
    """The answer (None when none came within 8 s) and the seconds it took."""
    began = time.monotonic()
    try:
        answer = requests.request(method, f"{proxy.url}{path}", timeout=8, **kwargs)
    except requests.Timeout:
        answer = None
    return answer, time.monotonic() - began


def late(name: str, answer: requests.Response | None, seconds: float) -> str | None:
    """What was wrong with the timing of this answer, or None."""
    if answer is None:
        return f"{name}: no answer within {seconds:.1f} s"
    if seconds >= ANSWER_WITHIN:
        return f"{name}: {seconds:.2f} s for {answer.status_code} {answer.text[:300]}"
    return None


def quick(proxy, method: str, path: str, **kwargs) -> requests.Response:
    """The answer, which must come within ANSWER_WITHIN seconds."""
    answer, seconds = timed(proxy, method, path, **kwargs)
    problem = late(f"{method} {path}", answer, seconds)
    assert problem is None, problem
    return answer


def engine_word(proxy, service_id: str = "llm") -> str:
    return quick(proxy, "GET", f"/api/v1/container/{service_id}").json()["engine"]


def docker_unavailable(answer: requests.Response, service_id: str) -> None:
    error_of(answer, 503, "docker_unavailable", service_id)


@pytest.fixture
def proxy_on_second_engine(start_proxy, second_engine, second_engine_prefix):
    """A proxy whose DOCKER_HOST is the second engine: llm to run, other and spare to start."""
    def start(**kwargs):
        services = {name: service_entry(free_port()) for name in ("llm", "other", "spare")}
        return start_proxy(services, docker_host=second_engine.host, prefix=second_engine_prefix, **kwargs)
    return start


# -- a frozen dockerd ---------------------------------------------------------------------------

@pytest.mark.engine
def test_admin_calls_in_the_first_second_of_a_hang_answer_within_3_s_and_change_nothing(
        proxy_on_second_engine, second_engine):
    proxy = proxy_on_second_engine()
    start_ready(proxy)
    calls = {
        "status": ("GET", "/api/v1/container/llm"),
        "services": ("GET", "/api/v1/services"),
        "stop": ("POST", "/api/v1/service/llm/stop"),
        "start": ("POST", "/api/v1/service/other/start"),
        "start and wait": ("POST", "/api/v1/service/spare/start?wait=true&timeout=60"),
        "healthz": ("GET", "/healthz"),
    }
    with concurrent.futures.ThreadPoolExecutor(len(calls) + 1) as pool:
        stream = pool.submit(requests.get, f"{proxy.url}/service/llm/stream", params={"events": 40, "delay": 0.1},
                             timeout=30)  # in flight: a stop would drain it before asking the engine
        wait_until(lambda: quick(proxy, "GET", "/api/v1/container/llm").json()["in_flight"] == 1, timeout=5,
                   what="the stream to be in flight")
        with frozen(second_engine.pid) as thawed:
            # Made at once, before the heartbeat can have noticed anything.
            futures = {name: pool.submit(timed, proxy, method, path) for name, (method, path) in calls.items()}
            answers = {name: future.result(timeout=20) for name, future in futures.items()}
            assert not thawed.is_set(), "the watchdog thawed the engine: the calls were not made on a hung one"
        streamed = stream.result(timeout=30)
    problems = [problem for name, (answer, seconds) in answers.items() if (problem := late(name, answer, seconds))]
    assert not problems, "late answers while the engine hung:\n" + "\n".join(problems)
    assert answers["status"][0].json()["state"] == "ready"
    # The others are stopped, or, caught in the moment a start sent alongside was being given
    # up, starting: the list is read at the same time as those calls.
    listed = [s["state"] for s in answers["services"][0].json()["services"]]
    assert listed[0] == "ready" and set(listed[1:]) <= {"stopped", "starting"}, listed
    docker_unavailable(answers["stop"][0], "llm")
    docker_unavailable(answers["start"][0], "other")
    docker_unavailable(answers["start and wait"][0], "spare")
    assert answers["healthz"][0].status_code == 200
    assert streamed.status_code == 200 and streamed.text.count("data: ") == 41  # 40 events and [DONE]: uncut

    # A 503 did nothing: once the engine is back, llm still runs and other never started.
    wait_until(lambda: engine_word(proxy) == "reachable", timeout=10, what="the engine to be back")
    time.sleep(1.0)  # time for anything the hung calls might still have set off
    assert quick(proxy, "GET", "/api/v1/container/llm").json()["state"] == "ready"
    assert quick(proxy, "GET", "/api/v1/container/other").json()["state"] == "stopped"
    assert quick(proxy, "GET", "/api/v1/container/spare").json()["state"] == "stopped"
    assert requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 200


@pytest.mark.engine
def test_a_hung_engine_gets_answers_within_3_s_forwarding_goes_on_and_all_recovers(
        proxy_on_second_engine, second_engine, second_engine_prefix):
    proxy = proxy_on_second_engine()
    start_ready(proxy)
    with frozen(second_engine.pid) as thawed:
        wait_until(lambda: engine_word(proxy) == "unreachable", timeout=ANSWER_WITHIN, interval=0.1,
                   what="the status to mark the engine unreachable")
        last_known = quick(proxy, "GET", "/api/v1/container/llm").json()
        assert (last_known["state"], last_known["status"], last_known["engine"]) == ("ready", "running", "unreachable")
        listed = quick(proxy, "GET", "/api/v1/services").json()["services"]
        assert [(s["service_id"], s["state"], s["engine"]) for s in listed] == \
            [("llm", "ready", "unreachable"), ("other", "stopped", "unreachable"), ("spare", "stopped", "unreachable")]
        docker_unavailable(quick(proxy, "POST", "/api/v1/service/llm/stop"), "llm")
        docker_unavailable(quick(proxy, "POST", "/api/v1/service/other/start"), "other")
        docker_unavailable(quick(proxy, "POST", "/api/v1/service/other/start",
                                 params={"wait": "true", "timeout": 60}), "other")
        assert quick(proxy, "GET", "/service/llm/v1/models").status_code == 200  # forwarding goes on
        assert quick(proxy, "GET", "/healthz").json()["docker_reachable"] is False
        assert not thawed.is_set(), "the watchdog thawed the engine: the calls were not made on a hung one"

    wait_until(lambda: engine_word(proxy) == "reachable", timeout=10, what="the engine to be back")
    assert quick(proxy, "GET", "/healthz").json()["docker_reachable"] is True
    assert requests.post(f"{proxy.url}/api/v1/service/llm/stop", timeout=30).status_code == 200
    start_ready(proxy, "other")
    # Stopped behind the proxy's back: only the events stream, renewed by itself, can say so.
    subprocess.run(["docker", "-H", second_engine.host, "stop", "-t", "1", f"{second_engine_prefix}-other"],
                   check=True, capture_output=True, timeout=30)
    wait_until(lambda: requests.get(f"{proxy.url}/service/other/v1/models", timeout=10).status_code == 503,
               timeout=5, what="the CLI's stop to be seen through the events stream")


@pytest.mark.engine
def test_a_stop_draining_when_the_engine_hangs_answers_503_within_3_s_and_the_service_serves_on(
        proxy_on_second_engine, second_engine):
    proxy = proxy_on_second_engine()
    start_ready(proxy)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = pool.submit(requests.get, f"{proxy.url}/service/llm/stream", params={"events": 60, "delay": 0.1},
                             timeout=30)
        wait_until(lambda: quick(proxy, "GET", "/api/v1/container/llm").json()["in_flight"] == 1, timeout=5,
                   what="the stream to be in flight")
        stop = pool.submit(timed, proxy, "POST", "/api/v1/service/llm/stop")  # drains the stream first
        wait_until(lambda: quick(proxy, "GET", "/api/v1/container/llm").json()["state"] == "stopping", timeout=5,
                   what="the stop to drain")
        with frozen(second_engine.pid) as thawed:
            began = time.monotonic()
            answer, _ = stop.result(timeout=20)
            seconds = time.monotonic() - began
            docker_unavailable(answer, "llm")
            assert seconds < ANSWER_WITHIN, f"the stop answered {seconds:.2f} s after the engine hung"
            assert quick(proxy, "GET", "/api/v1/container/llm").json()["state"] == "ready"
            assert quick(proxy, "GET", "/service/llm/v1/models").status_code == 200  # no longer refused
            assert not thawed.is_set(), "the watchdog thawed the engine: the calls were not made on a hung one"
        streamed = stream.result(timeout=30)
    assert streamed.status_code == 200 and streamed.text.count("data: ") == 61  # 60 events and [DONE]: uncut


# -- tcp:// engines that cannot be reached ------------------------------------------------------

@pytest.fixture(params=["nothing listening", "accepts and says nothing"])
def unreachable_tcp_engine(request):
    if request.param == "nothing listening":
        yield f"tcp://127.0.0.1:{free_port()}"
        return
    server = SilentServer().start()
    yield server.docker_host
    server.close()


def test_an_unreachable_tcp_engine_gets_admin_answers_within_3_s_and_the_proxy_serves(
        start_proxy, unreachable_tcp_engine):
    proxy = start_proxy({"llm": service_entry(free_port())}, docker_host=unreachable_tcp_engine,
                        prefix=f"iptest-{uuid.uuid4().hex[:8]}", wait=False)

    def serving() -> bool:  # a route that never asks the engine: the worker is up
        try:
            return requests.get(f"{proxy.url}/api/v1/openapi.json", timeout=1).status_code == 200
        except requests.RequestException:
            return False
    wait_until(serving, timeout=30, what="the proxy to serve")

    assert quick(proxy, "GET", "/healthz").json()["docker_reachable"] is False
    wait_until(lambda: engine_word(proxy) == "unreachable", timeout=ANSWER_WITHIN, interval=0.1,
               what="the status to mark the engine unreachable")
    status = quick(proxy, "GET", "/api/v1/container/llm").json()
    assert (status["status"], status["engine"]) == ("unknown", "unreachable")
    assert [s["engine"] for s in quick(proxy, "GET", "/api/v1/services").json()["services"]] == ["unreachable"]
    docker_unavailable(quick(proxy, "POST", "/api/v1/service/llm/start"), "llm")
    docker_unavailable(quick(proxy, "POST", "/api/v1/service/llm/start", params={"wait": "true"}), "llm")
    docker_unavailable(quick(proxy, "POST", "/api/v1/service/llm/stop"), "llm")
    assert quick(proxy, "GET", "/healthz").json()["docker_reachable"] is False


@pytest.mark.engine
def test_a_blackholed_tcp_engine_gets_answers_within_3_s_and_all_recovers_when_it_heals(
        start_proxy, second_engine, second_engine_prefix):
    relay = BlackholeRelay(str(second_engine.spec.socket)).start()
    try:
        services = {name: service_entry(free_port()) for name in ("llm", "other")}
        proxy = start_proxy(services, docker_host=relay.docker_host, prefix=second_engine_prefix)
        start_ready(proxy)
        relay.blackhole()
        wait_until(lambda: engine_word(proxy) == "unreachable", timeout=ANSWER_WITHIN, interval=0.1,
                   what="the status to mark the engine unreachable")
        assert quick(proxy, "GET", "/api/v1/container/llm").json()["state"] == "ready"
        docker_unavailable(quick(proxy, "POST", "/api/v1/service/llm/stop"), "llm")
        docker_unavailable(quick(proxy, "POST", "/api/v1/service/other/start"), "other")
        assert quick(proxy, "GET", "/service/llm/v1/models").status_code == 200
        time.sleep(1.0)  # the events stream is asked for again meanwhile, into the blackhole

        relay.heal()  # what was asked in the blackhole stays unanswered: only asking again helps
        wait_until(lambda: engine_word(proxy) == "reachable", timeout=20, what="the engine to be back")
        assert requests.post(f"{proxy.url}/api/v1/service/llm/stop", timeout=30).status_code == 200
        start_ready(proxy, "other")
        subprocess.run(["docker", "-H", second_engine.host, "stop", "-t", "1", f"{second_engine_prefix}-other"],
                       check=True, capture_output=True, timeout=30)
        wait_until(lambda: requests.get(f"{proxy.url}/service/other/v1/models", timeout=10).status_code == 503,
                   timeout=5, what="the CLI's stop to be seen through the events stream")
    finally:
        relay.close()


# -- the heartbeat ------------------------------------------------------------------------------

class _PingFailingOnceOddly:
    """A ping that first fails as no Docker error would (a bug, a broken client), then answers."""

    def __init__(self):
        self.pings = 0

    def ping(self) -> bool:
        self.pings += 1
        if self.pings == 1:
            raise ValueError("not a Docker error")
        return True


def test_a_ping_failing_in_an_unexpected_way_counts_as_unanswered_and_the_heartbeat_goes_on():
    from proxy.services.container_states import ContainerStates

    engine = _PingFailingOnceOddly()
    states = ContainerStates(engine)
    beating = threading.Thread(target=states._heartbeat, daemon=True)
    beating.start()
    try:
        wait_until(lambda: engine.pings >= 3, timeout=5, what="the heartbeat to go on pinging")
        assert not states.hung.is_set()  # it answered since
    finally:
        states.stop()
        beating.join(5)
