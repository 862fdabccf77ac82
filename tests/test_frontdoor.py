"""The OpenAI front door and the on-demand lifecycle, end to end on the real Docker engine.

A proxy under real gunicorn (1 or 2 gevent workers) whose services run the test image;
requests go to ``/v1/...`` and are routed by their ``model``. Containers start on demand
(``autostart``), stop when idle (``idle_timeout``), take turns in an exclusive group, and
requests queue or are refused under ``max_concurrent``/``max_queue``.

Each test gets its own container prefix; every container under it is force-removed
afterwards (the ``container_prefix`` fixture).
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
import time

import docker
import openai
import pytest
import requests

from conftest import free_port, service_entry, wait_for_proxy, wait_until
from docker_relay import DockerRelay
from engine_api import error_of

pytestmark = pytest.mark.engine

MESSAGES = [{"role": "user", "content": "hello there"}]
# A response object the test still holds keeps its socket open (urllib3), and the proxy's
# worker then waits out its keep-alive on stop: one connection per request keeps teardown quick.
CLOSE = {"Connection": "close"}
INSTANCE_LABEL = "io.inference-proxy.instance"


@pytest.fixture
def synced_proxy(engine_proxy):
    """Factory: conftest's ``engine_proxy``, returned once every worker has listed its
    containers (a request before that is the subject of
    test_a_cold_request_before_the_engine_first_answered_starts_the_service)."""
    def start(services: dict, **kwargs):
        proxy = engine_proxy(services, **kwargs)
        workers = kwargs.get("workers", 1)
        wait_until(lambda: proxy.log().count("Docker engine reachable") >= workers, timeout=15,
                   what="every worker to know its containers' states")
        return proxy
    return start


def backend_args(load_seconds: float = 0) -> list[str]:
    args = ["--host", "0.0.0.0", "--port", "8080"]
    return args + ["--load-seconds", str(load_seconds)] if load_seconds else args


def on_demand(load_seconds: float = 0, **overrides) -> dict:
    """An autostart service of the test image."""
    return service_entry(free_port(), args=backend_args(load_seconds), autostart=True, start_timeout=60,
                         **overrides)


def tokens(n: int) -> list[str]:
    return [f"tok{i}" for i in range(n)]


def chat(proxy, model: str, *, max_tokens: int = 4, timeout: float = 60, session=None,
         **extra) -> requests.Response:
    """A non-streamed chat completion through the front door."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, **extra}
    return (session or requests).post(f"{proxy.url}/v1/chat/completions", json=body, headers=CLOSE,
                                      timeout=timeout)


def open_stream(proxy, model: str, *, max_tokens: int = 4, delay: float | None = None,
                timeout: float = 60) -> requests.Response:
    params = {"delay": delay} if delay is not None else None
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    return requests.post(f"{proxy.url}/v1/chat/completions", params=params, json=body, headers=CLOSE,
                         stream=True, timeout=timeout)


def sse_lines(answer: requests.Response):
    """The non-empty lines of an event stream, each as it arrives."""
    for line in answer.iter_lines(chunk_size=1):
        if line:
            yield line.decode()


def stream_text(lines: list[str]) -> list[str]:
    """The tokens carried by the data events of a chat completion stream (which ended with [DONE])."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", lines[-5:]
    chunks = [json.loads(event) for event in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).split()


def content(answer: requests.Response) -> list[str]:
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["message"]["content"].split()


def listed_containers(client, prefix: str, running_only: bool = False) -> list[dict]:
    """The prefix's containers as the engine lists them (one call: docker-py's
    ``containers.list`` inspects each one after, and fails if one is removed meanwhile)."""
    filters = {"label": f"{INSTANCE_LABEL}={prefix}", **({"status": "running"} if running_only else {})}
    return client.api.containers(all=True, filters=filters)


def running(client, prefix: str) -> list[dict]:
    return listed_containers(client, prefix, running_only=True)


class ContainerWatch:
    """Polls the engine in a thread: the most containers of the prefix seen running at once,
    each distinct set of running services in turn, and every container id seen."""

    def __init__(self, prefix: str, interval: float = 0.05):
        self.prefix, self.interval = prefix, interval
        self.max_running = 0
        self.running_services: list[tuple[str, ...]] = []  # each distinct running set, in order
        self.ids: set[str] = set()
        self.polls = 0
        self.errors: list[Exception] = []
        self._stop = threading.Event()
        self._client = docker.from_env(timeout=30)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ContainerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(10)
        self._client.close()
        assert not self.errors, f"watching the engine failed: {self.errors[:3]}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                every = listed_containers(self._client, self.prefix)
            except Exception as exc:  # noqa: BLE001 - reported at the end, the watch goes on
                self.errors.append(exc)
            else:
                self.ids.update(c["Id"] for c in every)
                up = tuple(sorted(c["Labels"]["io.inference-proxy.service"] for c in every
                                  if c["State"] == "running"))
                self.max_running = max(self.max_running, len(up))
                if up and (not self.running_services or self.running_services[-1] != up):
                    self.running_services.append(up)
                self.polls += 1
            self._stop.wait(self.interval)


# -- 1. routing by model, with the openai SDK -----------------------------------------------

def test_the_openai_sdk_reaches_each_service_by_its_id_or_alias_streamed_or_not(synced_proxy):
    proxy = synced_proxy({
        "alpha": on_demand(),
        "beta": on_demand(aliases=["beta-chat:7b", "org/Beta-7B"], model_name="served-beta"),
    })
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        _ask_both_services(client)


def _ask_both_services(client: openai.OpenAI) -> None:
    by_id = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=3)
    assert by_id.choices[0].message.content.split() == tokens(3)
    assert by_id.model == "alpha"  # no model_name: the backend sees the model as sent
    by_alias = client.chat.completions.create(model="beta-chat:7b", messages=MESSAGES, max_tokens=5)
    assert by_alias.choices[0].message.content.split() == tokens(5)
    assert by_alias.model == "served-beta"  # model_name: rewritten before the backend sees it

    streamed = list(client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).split() == tokens(6)
    assert {c.model for c in streamed} == {"alpha"}
    streamed = list(client.chat.completions.create(model="org/Beta-7B", messages=MESSAGES, max_tokens=4,
                                                   stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).split() == tokens(4)
    assert {c.model for c in streamed} == {"served-beta"}

    assert {m.id for m in client.models.list()} == {"alpha", "beta", "beta-chat:7b", "org/Beta-7B"}


def test_models_lists_every_id_and_alias_with_its_service_and_state(synced_proxy):
    proxy = synced_proxy({"alpha": on_demand(), "beta": on_demand(aliases=["beta-chat:7b", "org/Beta-7B"])})

    def listed() -> dict:
        with requests.get(f"{proxy.url}/v1/models", headers=CLOSE, timeout=10) as answer:
            assert answer.status_code == 200, answer.text
            assert answer.json()["object"] == "list"
            return {m["id"]: m for m in answer.json()["data"]}

    models = listed()
    assert {name: m["service_id"] for name, m in models.items()} == \
        {"alpha": "alpha", "beta": "beta", "beta-chat:7b": "beta", "org/Beta-7B": "beta"}
    assert all(m["object"] == "model" and (m["state"], m["status"]) == ("stopped", "not found")
               for m in models.values()), models

    assert content(chat(proxy, "org/Beta-7B")) == tokens(4)  # starts beta
    wait_until(lambda: listed()["beta-chat:7b"]["state"] == "ready", timeout=5, what="beta listed as ready")
    models = listed()
    assert models["beta"]["state"] == models["org/Beta-7B"]["state"] == "ready"
    assert models["beta"]["status"] == "running"
    assert models["alpha"]["state"] == "stopped"


def test_an_unknown_model_is_404_model_not_found_listing_the_known_ones(synced_proxy, docker_client,
                                                                          container_prefix):
    proxy = synced_proxy({"alpha": on_demand(), "beta": on_demand(aliases=["beta-chat:7b"])})
    error = error_of(chat(proxy, "gpt-17-turbo"), 404, "model_not_found")
    assert "gpt-17-turbo" in error["message"]
    assert error["known_models"] == ["alpha", "beta", "beta-chat:7b"]
    assert error["type"] == "not_found_error" and error["param"] == "model"

    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=30) as client, \
            pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-17-turbo", messages=MESSAGES)
    assert raised.value.code == "model_not_found"
    assert running(docker_client, container_prefix) == []  # nothing was started for it


def test_a_body_without_a_model_is_400(synced_proxy):
    proxy = synced_proxy({"alpha": on_demand()})
    url = f"{proxy.url}/v1/chat/completions"
    for body, code in [({"messages": MESSAGES}, "model_missing"),
                       ({"model": "", "messages": MESSAGES}, "model_missing"),
                       ({"model": 7, "messages": MESSAGES}, "model_missing"),
                       ([{"model": "alpha"}], "invalid_json")]:
        with requests.post(url, json=body, headers=CLOSE, timeout=10) as answer:
            error = error_of(answer, 400, code)
        assert error["type"] == "invalid_request_error"
    with requests.post(url, data=b"{not json", headers={"Content-Type": "application/json", **CLOSE},
                       timeout=10) as answer:
        error_of(answer, 400, "invalid_json")


# -- 2. a cold request starts its service ----------------------------------------------------

def test_a_cold_request_starts_its_autostart_service_and_gets_the_answer(synced_proxy, docker_client,
                                                                         container_prefix):
    proxy = synced_proxy({"cold": on_demand(load_seconds=2)})
    assert running(docker_client, container_prefix) == []
    sent = time.monotonic()
    answer = chat(proxy, "cold", max_tokens=5)
    assert content(answer) == tokens(5)
    assert time.monotonic() - sent >= 2.0, "answered before the backend could have loaded"
    (container,) = running(docker_client, container_prefix)
    assert container["Names"] == [f"/{container_prefix}-cold"]
    assert content(chat(proxy, "cold", max_tokens=2)) == tokens(2)  # warm now


def test_a_cold_streamed_request_gets_loading_comments_then_the_events(synced_proxy, docker_client,
                                                                       container_prefix):
    proxy = synced_proxy({"cold": on_demand(load_seconds=5)})
    with open_stream(proxy, "cold", max_tokens=4) as answer:
        assert answer.status_code == 200
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        assert answer.headers.get("X-Accel-Buffering") == "no"
        lines = list(sse_lines(answer))
    comments = [line for line in lines if line.startswith(":")]
    assert comments and set(comments) == {": loading"}, lines
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert lines[:first_data] == comments, "loading comments must all come before the first event"
    assert stream_text(lines[first_data:]) == tokens(4)
    assert len(running(docker_client, container_prefix)) == 1


class SlowEngine(DockerRelay):
    """The Docker socket, but answering nothing except /_ping and /version until ``open()``:
    a proxy whose workers have not yet heard which containers run."""

    def __init__(self, path: str):
        super().__init__(path)
        self.opened = threading.Event()

    def open(self) -> None:
        self.opened.set()

    def _from_proxy(self, data: bytes) -> None:
        request_line = data.split(b"\r\n", 1)[0]
        if b"/_ping" not in request_line and b"/version" not in request_line:
            self.opened.wait(30)  # hold every other Docker call until the engine "answers"


def test_a_cold_request_before_the_engine_first_answered_starts_the_service(engine_proxy, docker_client,
                                                                            container_prefix, tmp_path):
    engine = SlowEngine(str(tmp_path / "docker.sock")).start()
    opens = threading.Timer(2.0, engine.open)  # the engine answers while the request waits
    try:
        proxy = engine_proxy({"cold": on_demand()}, docker_host=engine.docker_host, wait=False)
        wait_for_proxy(proxy)  # /healthz pings the engine: that passes
        with requests.get(f"{proxy.url}/v1/models", headers=CLOSE, timeout=10) as listed:
            assert listed.json()["data"][0]["status"] == "unknown"  # the container list has not come
        opens.start()
        answer = chat(proxy, "cold", max_tokens=3)
        assert answer.status_code == 200, f"{answer.status_code} {answer.text}"
        assert content(answer) == tokens(3)
        assert len(running(docker_client, container_prefix)) == 1
    finally:
        opens.cancel()
        engine.open()
        engine.stop()


# -- 3. one start for many cold requests -----------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_cold_requests_make_one_container_and_all_get_answers(synced_proxy, docker_client,
                                                                         container_prefix, workers):
    proxy = synced_proxy({"cold": on_demand(load_seconds=2)}, workers=workers)

    def one(i: int) -> list[str]:
        with requests.Session() as session:  # a connection each, so both workers get some
            return content(chat(proxy, "cold", max_tokens=1 + i % 4, session=session))

    with ContainerWatch(container_prefix) as watch, concurrent.futures.ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(one, i) for i in range(10)]
        answers = [future.result(timeout=90) for future in futures]
    assert answers == [tokens(1 + i % 4) for i in range(10)]
    (container,) = listed_containers(docker_client, container_prefix)
    assert container["State"] == "running"
    assert watch.ids == {container["Id"]}, "a container was made more than once"


def test_cold_starts_racing_in_two_workers_all_succeed(synced_proxy, container_prefix):
    """Both workers start a service at the same moment. Docker reserves the name as soon as
    one create begins, so the other's create fails with 409; that worker must wait for the
    winner's container, not report the start as failed."""
    names = [f"svc{i}" for i in range(6)]
    proxy = synced_proxy({name: on_demand() for name in names}, workers=2)

    def ask(model: str) -> str:
        answer = chat(proxy, model, max_tokens=1)
        return "200" if answer.status_code == 200 else f"{answer.status_code} {answer.json()['error']['code']}"

    def stop(name: str) -> int:
        with requests.post(f"{proxy.url}/api/v1/service/{name}/stop", headers=CLOSE, timeout=30) as answer:
            return answer.status_code

    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        for _ in range(3):  # each round: 6 races, of which the old code lost a few
            outcomes = list(pool.map(ask, [name for name in names for _ in range(10)], timeout=90))
            assert collections.Counter(outcomes) == {"200": 60}, dict(collections.Counter(outcomes))
            assert list(pool.map(stop, names, timeout=60)) == [200] * len(names)


# -- 4. idle stop ------------------------------------------------------------------------------

def _stopped_within(client, prefix: str, timeout: float) -> float:
    """When the container stopped, waiting until it is also gone (the proxy removes it)."""
    wait_until(lambda: not running(client, prefix), timeout=timeout, interval=0.1, what="the idle stop")
    stopped = time.monotonic()
    wait_until(lambda: not listed_containers(client, prefix), timeout=10, interval=0.1, what="the container's removal")
    return stopped


def test_an_idle_service_is_stopped_after_its_idle_timeout(synced_proxy, docker_client, container_prefix):
    proxy = synced_proxy({"lazy": on_demand(idle_timeout="3s")})
    assert content(chat(proxy, "lazy")) == tokens(4)
    answered = time.monotonic()
    assert len(running(docker_client, container_prefix)) == 1
    stopped = _stopped_within(docker_client, container_prefix, timeout=15)
    assert stopped - answered >= 2.5, f"stopped {stopped - answered:.1f} s after the request: before idle_timeout"
    assert "idle for more than 3 s" in proxy.log()
    # It starts again on the next request.
    assert content(chat(proxy, "lazy", max_tokens=2)) == tokens(2)
    assert len(running(docker_client, container_prefix)) == 1


def test_an_idle_stop_waits_for_a_long_request_in_flight(synced_proxy, docker_client, container_prefix):
    proxy = synced_proxy({"lazy": on_demand(idle_timeout="3s")})
    assert content(chat(proxy, "lazy", max_tokens=1)) == tokens(1)  # started; the stream below is warm
    sent = time.monotonic()
    with ContainerWatch(container_prefix, interval=0.1) as watch:
        lines = []
        with open_stream(proxy, "lazy", max_tokens=8, delay=1.0, timeout=30) as answer:  # ~8 s
            assert answer.status_code == 200
            for line in sse_lines(answer):
                lines.append(line)
                assert watch.max_running == 1 and len(running(docker_client, container_prefix)) == 1, \
                    f"stopped {time.monotonic() - sent:.1f} s into a request in flight"
        ended = time.monotonic()
        assert ended - sent >= 7.0, "the stream was meant to outlast idle_timeout"
        assert stream_text(lines) == tokens(8)
        assert len(running(docker_client, container_prefix)) == 1, "stopped as the request ended"
        assert len(watch.ids) == 1 and watch.running_services == [("lazy",)]
    stopped = _stopped_within(docker_client, container_prefix, timeout=15)
    assert stopped - ended >= 2.5, f"stopped {stopped - ended:.1f} s after the request ended"


# -- 5. an exclusive group ---------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_an_exclusive_group_runs_one_service_at_a_time_and_loses_no_request(synced_proxy, container_prefix,
                                                                            workers):
    services = {name: on_demand(group="gpu0", drain_timeout=10) for name in ("one", "two")}
    proxy = synced_proxy(services, workers=workers, groups={"gpu0": {"exclusive": True}})

    def ask(model: str, n: int) -> tuple[str, list[str]]:
        with requests.Session() as session:
            answer = chat(proxy, model, max_tokens=n, session=session, timeout=90)
            return answer.json().get("model"), content(answer)

    with ContainerWatch(container_prefix) as watch:
        for i, model in enumerate(["one", "two"] * 3):  # sequential A, B, A, B, ...
            assert ask(model, 1 + i) == (model, tokens(1 + i))
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for _ in range(2):  # concurrent pairs
                futures = {model: pool.submit(ask, model, 3) for model in ("one", "two")}
                assert {m: f.result(timeout=120) for m, f in futures.items()} == \
                    {m: (m, tokens(3)) for m in ("one", "two")}
            # A stream in flight on one while two is asked for: it finishes, then two runs.
            with open_stream(proxy, "one", max_tokens=6, delay=0.3) as stream:
                lines = iter(sse_lines(stream))
                first = next(lines)
                other = pool.submit(ask, "two", 2)
                assert stream_text([first, *lines]) == tokens(6), "the swap cut a request in flight"
            assert other.result(timeout=120) == ("two", tokens(2))
    assert watch.polls > 20
    assert watch.max_running <= 1, f"both ran at once: {watch.running_services}"
    assert len(watch.running_services) >= 6  # it really took turns


# -- 6. max_concurrent and max_queue --------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_over_max_concurrent_and_max_queue_is_429_and_the_queued_one_goes_next(synced_proxy, workers):
    proxy = synced_proxy({"narrow": on_demand(max_concurrent=1, max_queue=1)}, workers=workers)
    assert content(chat(proxy, "narrow", max_tokens=1)) == tokens(1)  # running and idle now

    times = {}

    def queued() -> list[str]:
        sent = time.monotonic()
        with open_stream(proxy, "narrow", max_tokens=3) as answer:
            assert answer.status_code == 200
            lines = list(sse_lines(answer))
        times["queued_sent"], times["queued_done"] = sent, time.monotonic()
        return stream_text(lines)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with open_stream(proxy, "narrow", max_tokens=6, delay=0.5) as first:  # ~3 s in flight
            assert first.status_code == 200
            lines = sse_lines(first)
            received = [next(lines)]  # in flight now
            waiting = pool.submit(queued)
            time.sleep(0.5)  # let it take the one place in the queue
            with requests.Session() as session:  # another connection: maybe another worker
                refused = chat(proxy, "narrow", session=session, timeout=10)
            error = error_of(refused, 429, "too_many_requests")
            assert refused.headers["Retry-After"] == "1"
            assert error["type"] == "rate_limit_error" and error["service_id"] == "narrow"
            assert not waiting.done(), "the queued request did not wait for the one in flight"
            received += list(lines)
        first_done = time.monotonic()
        assert stream_text(received) == tokens(6)
        assert waiting.result(timeout=30) == tokens(3)
    assert times["queued_done"] >= first_done - 0.2, "the queued request finished before the first"
    assert times["queued_done"] - times["queued_sent"] >= 2.0
    # Free again: a new request is admitted at once.
    assert content(chat(proxy, "narrow", max_tokens=2, timeout=10)) == tokens(2)
