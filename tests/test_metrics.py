"""``GET /metrics``: the proxy's own families, under real gunicorn with two workers.

Traffic of every kind goes through the proxy (JSON and streamed answers on both routes, a
413, a 429, a 502, a 504, a broken stream, clients that leave); one scrape, answered by any
worker, must count all of it; killing the workers that did the counting loses nothing;
and a new run of the proxy starts from zero. The backends are the stand-in's processes;
the lifecycle families (starts, stops, swaps) are in test_metrics_lifecycle.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, free_port, service_entry, wait_for_proxy, wait_until
from metrics_scrape import CLOSE, chat, expected_tokens, hold, scrape, value, worker_pids
from proxy import __version__

# The families a run of traffic moves; compared before and after the workers die.
COUNTED = ("inference_proxy_requests_total", "inference_proxy_rejected_total",
           "inference_proxy_upstream_errors_total", "inference_proxy_client_disconnects_total",
           "inference_proxy_tokens_total", "inference_proxy_request_duration_seconds_count",
           "inference_proxy_time_to_first_byte_seconds_count", "inference_proxy_tokens_per_second_count")


BOUNDED_LABELS = {"service", "route", "code", "reason", "kind", "outcome", "stage", "group", "state", "version", "le"}


def counted(samples: dict) -> dict:
    return {key: count for key, count in samples.items() if key[0] in COUNTED and count}


def test_every_family_counts_the_traffic_of_both_workers_and_outlives_them(start_backend, start_proxy):
    llm, limited, slow = start_backend("--metrics"), start_backend(), start_backend()
    proxy = start_proxy({
        "llm": service_entry(llm.port, max_body_size="1k"),
        "limited": service_entry(limited.port, max_concurrent=1, max_queue=1, metrics_path=None),
        "slow": service_entry(slow.port, timeouts={"read": 0.5}, metrics_path=None),
        "dead": service_entry(free_port(), metrics_path=None),
    }, workers=2, log_level="INFO")
    base = proxy.url

    answers = [chat(f"{base}/service/llm/v1/chat/completions") for _ in range(3)]
    answers += [chat(f"{base}/v1/chat/completions", model="llm", stream=True, include_usage=True) for _ in range(2)]
    answers.append(chat(f"{base}/service/llm/v1/chat/completions", stream=True))  # tokens from timings only
    assert all(timings for _, timings in answers) and all(usage for usage, _ in answers[:5])
    assert requests.post(f"{base}/service/llm/echo", data=b"x" * 2048, headers=CLOSE).status_code == 413
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # the backend resets mid-stream
        requests.get(f"{base}/service/llm/die", headers=CLOSE, timeout=10).content
    assert requests.get(f"{base}/service/dead/health", headers=CLOSE).status_code == 502
    assert requests.get(f"{base}/service/slow/hang?seconds=5", headers=CLOSE).status_code == 504
    # No path, unknown service or model name becomes a label.
    assert requests.get(f"{base}/service/llm/no/such/path?key=1", headers=CLOSE).status_code == 404  # the backend's
    assert requests.get(f"{base}/service/nobody/x", headers=CLOSE).status_code == 404
    assert requests.post(f"{base}/v1/chat/completions", json={"model": "nobody"}, headers=CLOSE).status_code == 404

    # One request in flight and one queued on `limited`: every worker reports both.
    in_flight = hold(proxy, "/service/limited/hang?seconds=30")
    wait_until(lambda: value(scrape(proxy), "inference_proxy_in_flight", service="limited") == 1,
               what="the held request in flight")
    queued = hold(proxy, "/service/limited/hang?seconds=30")
    wait_until(lambda: value(scrape(proxy), "inference_proxy_queued", service="limited") == 1,
               what="the second request queued")
    for _ in range(6):
        samples = scrape(proxy)
        assert (value(samples, "inference_proxy_in_flight", service="limited"),
                value(samples, "inference_proxy_queued", service="limited")) == (1, 1)
    refused = requests.post(f"{base}/v1/chat/completions", json={"model": "limited", "messages": []}, headers=CLOSE)
    assert refused.status_code == 429
    in_flight.close()
    queued.close()  # both clients leave: one was being answered, one was waiting
    wait_until(lambda: value(scrape(proxy), "inference_proxy_client_disconnects_total", service="limited") == 2,
               what="both disconnects counted")

    samples = scrape(proxy)
    tokens = [expected_tokens(*answer) for answer in answers]
    rates = sum(timings["predicted_per_second"] for _, timings in answers)
    expected = [  # (sample, labels, count)
        ("inference_proxy_requests_total", dict(service="llm", route="service", code="200"), 5),  # 3 JSON, 1 stream, /die
        ("inference_proxy_requests_total", dict(service="llm", route="openai", code="200"), 2),
        ("inference_proxy_requests_total", dict(service="llm", route="service", code="413"), 1),
        ("inference_proxy_requests_total", dict(service="llm", route="service", code="404"), 1),
        ("inference_proxy_requests_total", dict(service="dead", route="service", code="502"), 1),
        ("inference_proxy_requests_total", dict(service="slow", route="service", code="504"), 1),
        ("inference_proxy_requests_total", dict(service="limited", route="service", code="499"), 2),
        ("inference_proxy_requests_total", dict(service="limited", route="openai", code="429"), 1),
        ("inference_proxy_rejected_total", dict(service="llm", reason="body_too_large"), 1),
        ("inference_proxy_rejected_total", dict(service="limited", reason="queue_full"), 1),
        ("inference_proxy_upstream_errors_total", dict(service="dead", kind="unreachable"), 1),
        ("inference_proxy_upstream_errors_total", dict(service="slow", kind="timeout"), 1),
        ("inference_proxy_upstream_errors_total", dict(service="llm", kind="broken_stream"), 1),
        ("inference_proxy_client_disconnects_total", dict(service="limited"), 2),
        ("inference_proxy_tokens_total", dict(service="llm", kind="prompt"), sum(p for p, _ in tokens)),
        ("inference_proxy_tokens_total", dict(service="llm", kind="completion"), sum(c for _, c in tokens)),
        ("inference_proxy_request_duration_seconds_count", dict(service="llm"), 8),  # the backend's answers
        ("inference_proxy_time_to_first_byte_seconds_count", dict(service="llm"), 8),
        ("inference_proxy_tokens_per_second_count", dict(service="llm"), 6),
    ]
    for name, labels, count in expected:
        assert value(samples, name, **labels) == count, (name, labels)
    assert counted(samples).keys() == {(name, tuple(sorted(labels.items()))) for name, labels, _ in expected}
    assert value(samples, "inference_proxy_tokens_per_second_sum", service="llm") == pytest.approx(rates)
    for name, labels in samples:
        if name.startswith("inference_proxy_"):
            assert {key for key, _ in labels} <= BOUNDED_LABELS, (name, labels)
            assert dict(labels).get("service", "llm") in {"llm", "limited", "slow", "dead"}, (name, labels)
    assert (value(samples, "inference_proxy_in_flight", service="limited"),
            value(samples, "inference_proxy_queued", service="limited")) == (0, 0)
    assert value(samples, "inference_proxy_build_info", version=__version__) == 1
    assert value(samples, "inference_proxy_docker_engine_up") == 0  # this proxy has no engine
    # The stand-in's own count, relabelled: what it generated for the answers it finished.
    assert value(samples, "llamacpp:tokens_predicted_total", service="llm") == sum(c for _, c in tokens)
    assert value(samples, "inference_proxy_backend_scrape_errors_total", service="dead") == 0  # metrics_path: null

    # Kill the workers that counted, one after the other: their counts stay.
    before = counted(samples)
    for doomed in sorted(worker_pids(proxy)):
        os.kill(doomed, signal.SIGKILL)
        wait_until(lambda: doomed not in worker_pids(proxy) and len(worker_pids(proxy)) == 2, timeout=30,
                   what="gunicorn to replace the killed worker")
        wait_for_proxy(proxy)
        assert counted(scrape(proxy)) == before
    assert value(scrape(proxy), "inference_proxy_in_flight", service="limited") == 0


def test_a_new_run_of_the_proxy_starts_from_zero(start_backend, start_proxy, tmp_path):
    """Even when it inherits PROMETHEUS_MULTIPROC_DIR pointing at an earlier run's counts."""
    backend = start_backend()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    first = start_proxy({"llm": service_entry(backend.port, metrics_path=None)}, workers=2,
                        env={"TMPDIR": str(tmp)})
    for _ in range(4):
        chat(f"{first.url}/service/llm/v1/chat/completions")
    assert value(scrape(first), "inference_proxy_requests_total", service="llm", route="service", code="200") == 4
    [directory] = list(tmp.glob("inference-proxy-metrics-*"))  # the run's own, in TMPDIR
    leftover = shutil.copytree(directory, tmp_path / "earlier-run")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    assert not list(tmp.glob("inference-proxy-metrics-*")), "the run's directory outlived it"

    env = {**first.env, "PROMETHEUS_MULTIPROC_DIR": str(leftover)}
    with open(first.log_path, "ab") as log:
        second = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        first.proc = second  # same config file and port; stopped by the fixture
        wait_for_proxy(first)
        samples = scrape(first)
        assert value(samples, "inference_proxy_requests_total", service="llm", route="service", code="200") is None
        assert value(samples, "inference_proxy_request_duration_seconds_count", service="llm") == 0
        chat(f"{first.url}/service/llm/v1/chat/completions")
        assert value(scrape(first), "inference_proxy_requests_total", service="llm", route="service", code="200") == 1
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)


def test_a_reload_keeps_the_counts(start_backend, start_proxy, tmp_path):
    """SIGHUP runs gunicorn.conf.py again and replaces every worker: same directory, same counts."""
    backend = start_backend()
    proxy = start_proxy({"llm": service_entry(backend.port, metrics_path=None)}, workers=2,
                        env={"TMPDIR": str(tmp_path)})
    for _ in range(3):
        chat(f"{proxy.url}/service/llm/v1/chat/completions")
    old_workers = worker_pids(proxy)
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not worker_pids(proxy) & old_workers and len(worker_pids(proxy)) == 2, timeout=30,
               what="new workers after the reload")
    wait_for_proxy(proxy)
    assert value(scrape(proxy), "inference_proxy_requests_total", service="llm", route="service", code="200") == 3
    assert len(list(tmp_path.glob("inference-proxy-metrics-*"))) == 1


def test_tokens_come_from_usage_else_timings_at_the_end_of_answers(start_backend, start_proxy):
    backend = start_backend("--token-delay", "0.005")
    proxy = start_proxy({"llm": service_entry(backend.port, metrics_path=None)})
    url = f"{proxy.url}/service/llm/v1/chat/completions"
    plain = chat(url, max_tokens=5)
    streamed = chat(url, stream=True, include_usage=True, max_tokens=7)
    bare = chat(url, stream=True, max_tokens=4)
    # What the stand-in sends, as llama-server: usage in JSON answers and when asked for in a
    # stream, timings on the last event.
    assert plain[0] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9} and plain[1]
    assert streamed[0]["completion_tokens"] == 7 and streamed[1]["predicted_n"] == 7
    assert bare[0] is None and bare[1]["predicted_n"] == 4 and bare[1]["prompt_n"] == 4

    samples = scrape(proxy)
    assert value(samples, "inference_proxy_tokens_total", service="llm", kind="prompt") == 12
    assert value(samples, "inference_proxy_tokens_total", service="llm", kind="completion") == 16
    rates = [timings["predicted_per_second"] for _, timings in (plain, streamed, bare)]
    assert value(samples, "inference_proxy_tokens_per_second_count", service="llm") == 3
    assert value(samples, "inference_proxy_tokens_per_second_sum", service="llm") == pytest.approx(sum(rates))
    below_500 = value(samples, "inference_proxy_tokens_per_second_bucket", service="llm", le="500.0")
    assert below_500 == sum(rate <= 500 for rate in rates)  # 5 ms a token: about 200 a second


def test_the_admin_token_guards_metrics(start_backend, start_proxy):
    proxy = start_proxy({"llm": service_entry(start_backend().port)}, server_extra={"admin_token": "s3cret-token"})
    refused = requests.get(f"{proxy.url}/metrics", headers=CLOSE)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = requests.get(f"{proxy.url}/metrics", headers={**CLOSE, "Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    samples = scrape(proxy, {"Authorization": "Bearer s3cret-token"})
    assert value(samples, "inference_proxy_build_info", version=__version__) == 1


def test_without_gunicorn_the_counts_live_in_the_process(start_backend):
    """create_app in one process (tests, flask run): plain registry mode."""
    from proxy import create_app
    from proxy.config import load_config_text

    backend = start_backend()
    config = load_config_text(f"services:\n  solo:\n    type: llama-cpp-server\n    image: x\n"
                              f"    port: {backend.port}\n    metrics_path: null\n")
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    app = create_app(config, docker_client=object())
    try:
        client = app.test_client()

        def requests_counted() -> float:
            text = client.get("/metrics").get_data(as_text=True)
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "inference_proxy_requests_total" and sample.labels["service"] == "solo":
                        return sample.value
            return 0

        before = requests_counted()
        answer = client.post("/service/solo/v1/chat/completions", json={"messages": [], "max_tokens": 2})
        assert answer.status_code == 200 and answer.get_json()["usage"]["completion_tokens"] == 2
        answer.close()
        assert requests_counted() == before + 1
    finally:
        app.extensions["proxy"].close()
