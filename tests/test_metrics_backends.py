"""The model servers' own metrics in the proxy's ``/metrics``: each server's families with a
``service`` label, one family for the same name from several servers, and a server that
hangs, fails or talks nonsense left out of that scrape at the cost of its timeout at most.
The servers are the stand-in's processes (llama-server's exposition format) under a real
gunicorn proxy.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from conftest import free_port, service_entry
from metrics_scrape import CLOSE, chat, scrape, value

SCRAPE_TIMEOUT = 1.0  # proxy.metrics.backends.SCRAPE_TIMEOUT


@pytest.fixture
def silent_server():
    """Factory: the port of a raw socket that accepts connections and never answers (all
    closed after the test)."""
    stop, threads, sockets = threading.Event(), [], []

    def accept(listener):
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                sockets.append(listener.accept()[0])
            except socket.timeout:
                continue

    def start() -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        sockets.append(listener)
        threads.append(threading.Thread(target=accept, args=(listener,), daemon=True))
        threads[-1].start()
        return listener.getsockname()[1]

    yield start
    stop.set()
    for thread in threads:
        thread.join(5)
    for sock in sockets:
        sock.close()


def test_each_servers_families_come_relabelled_and_merged_under_one_type(start_backend, start_proxy):
    first, second = start_backend("--metrics"), start_backend("--metrics")
    proxy = start_proxy({"first": service_entry(first.port), "second": service_entry(second.port)})
    generated = {"first": 0, "second": 0}
    for service_id, tokens in (("first", 3), ("first", 5), ("second", 4)):
        chat(f"{proxy.url}/service/{service_id}/v1/chat/completions", max_tokens=tokens)
        generated[service_id] += tokens

    text = requests.get(f"{proxy.url}/metrics", headers=CLOSE, timeout=10).text
    samples = scrape(proxy)  # parses, and no family or TYPE line twice
    for service_id, tokens in generated.items():
        assert value(samples, "llamacpp:tokens_predicted_total", service=service_id) == tokens
        assert value(samples, "llamacpp:prompt_tokens_total", service=service_id) > 0
        assert value(samples, "llamacpp:requests_processing", service=service_id) == 0
        assert value(samples, "llamacpp:kv_cache_usage_ratio", service=service_id) == 0
        assert value(samples, "inference_proxy_backend_scrape_errors_total", service=service_id) == 0
    lines = text.splitlines()
    # Names, help and types as llama-server wrote them, once for both servers.
    assert lines.count("# TYPE llamacpp:tokens_predicted_total counter") == 1
    assert lines.count("# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.") == 1
    assert lines.count("# TYPE llamacpp:kv_cache_usage_ratio gauge") == 1
    assert sum(line.startswith("llamacpp:tokens_predicted_total{") for line in lines) == 2
    # A counter without _total keeps its name (untyped, see proxy/metrics/backends.py).
    assert value(samples, "llamacpp:n_tokens_max", service="first") == 4 + 5  # the largest prompt + answer


def test_a_hanging_failing_or_garbled_server_costs_a_scrape_its_timeout_at_most(start_backend, start_proxy,
                                                                                silent_server):
    good, plain, garbled, dripping = (start_backend("--metrics"), start_backend(), start_backend("--metrics"),
                                      start_backend())
    proxy = start_proxy({
        "good": service_entry(good.port),
        "silent": service_entry(silent_server()),               # accepts, never answers
        "mute": service_entry(silent_server()),                 # another one: asked at the same time
        "dripping": service_entry(dripping.port, metrics_path="/drip?bytes=100&interval=0.3"),  # 200, then 30 s
        "plain": service_entry(plain.port),                     # no --metrics: 501
        "garbled": service_entry(garbled.port, metrics_path="/v1/models"),  # JSON, not the format
        "gone": service_entry(free_port()),                     # nothing listens
        "off": service_entry(free_port(), metrics_path=None),   # never asked
    })
    chat(f"{proxy.url}/service/good/v1/chat/completions", max_tokens=2)
    for scrapes in (1, 2):
        started = time.monotonic()
        samples = scrape(proxy)
        took = time.monotonic() - started
        # Three servers that each hold on for good: one timeout for them all, not three.
        assert SCRAPE_TIMEOUT * 0.8 <= took < 2.5, f"a scrape took {took:.2f} s"
        assert value(samples, "llamacpp:tokens_predicted_total", service="good") == 2
        for service_id in ("silent", "mute", "dripping", "plain", "garbled", "gone"):
            assert value(samples, "inference_proxy_backend_scrape_errors_total", service=service_id) == scrapes
        assert value(samples, "inference_proxy_backend_scrape_errors_total", service="good") == 0
        assert value(samples, "inference_proxy_backend_scrape_errors_total", service="off") == 0
        assert not [key for key in samples if key[0].startswith("llamacpp:") and ("service", "good") not in key[1]]
