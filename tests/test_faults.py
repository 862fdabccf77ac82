"""Faults, for real: a dripping backend, crashing and OOM-killed containers, one service's
trouble next to another's traffic, and gunicorn signalled while streams are in flight.

Real processes throughout: the test backend as a process or in the test image on the real
Docker engine, the proxy under real gunicorn. Each engine test has its own container
prefix, and every container under it is removed afterwards (``container_prefix``).
Nothing here asserts a tight wall-clock time: only order, completeness and loose bounds.
"""
from __future__ import annotations

import json
import queue
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import free_port, service_entry, wait_until
from engine_api import api, error_of, start_ready, status
from sse import assert_complete, read_sse

# -- helpers ----------------------------------------------------------------------------------


def worker_pids(proxy) -> set[int]:
    master = proxy.proc.pid
    with open(f"/proc/{master}/task/{master}/children") as children:
        return {int(pid) for pid in children.read().split()}


# -- a backend that drips ----------------------------------------------------------------------

def test_a_dripping_backend_reaches_the_client_byte_by_byte(backend, start_proxy):
    """One byte a second, with timeouts.read at 3 s: each byte is handed on when it comes,
    in order, the body ends cleanly only after the fifth, and there is no 504."""
    proxy = start_proxy({"llm": service_entry(backend.port, timeouts={"connect": 2, "read": 3})})
    arrivals = []
    began = time.monotonic()
    with requests.get(f"{proxy.url}/service/llm/drip", params={"bytes": 5, "interval": 1},
                      stream=True, timeout=10) as response:
        assert response.status_code == 200, response.text
        for chunk in response.iter_content(chunk_size=None):  # raises if the body is cut short
            arrivals.extend((byte, time.monotonic() - began) for byte in chunk)
    assert [byte for byte, _ in arrivals] == [0, 1, 2, 3, 4]  # the drip's PATTERN bytes, in order
    # One at a time, as sent (a second apart), not gathered up and sent at the end.
    gaps = [later - earlier for (_, earlier), (_, later) in zip(arrivals, arrivals[1:])]
    assert all(gap > 0.5 for gap in gaps), arrivals
    assert arrivals[0][1] < 1.0, arrivals  # the first byte came at once, not after the others


def test_a_backend_stalling_past_the_read_timeout_mid_body_cuts_the_client_off(backend, start_proxy):
    """The other side of the same timeout: a gap longer than timeouts.read after the headers
    is not a 504 (the status has gone) but an incomplete body, never a clean end."""
    proxy = start_proxy({"llm": service_entry(backend.port, timeouts={"connect": 2, "read": 1})})
    received = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        with requests.get(f"{proxy.url}/service/llm/drip", params={"bytes": 3, "interval": 3},
                          stream=True, timeout=10) as response:
            assert response.status_code == 200
            for chunk in response.iter_content(chunk_size=None):
                received += chunk
    assert received == b"\x00"  # what came before the stall arrived intact
    wait_until(lambda: "broke off mid-response" in proxy.log(), timeout=5, what="the proxy to log the cut")


# -- a container that dies ---------------------------------------------------------------------

@pytest.mark.engine
@pytest.mark.parametrize("how", ["crash_via_proxy", "docker_kill"])
def test_a_crashed_container_is_reported_exited_and_answered_503(engine_proxy, docker_client, container_prefix, how):
    proxy = engine_proxy()
    start_ready(proxy)
    if how == "crash_via_proxy":
        answer = requests.post(f"{proxy.url}/service/llm/_crash", params={"code": 3}, timeout=10)
        assert answer.status_code == 200 and answer.json() == {"exiting": 3}
        expected_code = 3
    else:
        docker_client.containers.get(f"{container_prefix}-llm").kill()  # SIGKILL
        expected_code = 128 + signal.SIGKILL

    seen = wait_until(lambda: (s := status(proxy))["status"] == "exited" and s, timeout=10,
                      what="the status to show the container exited")
    assert seen["exit_code"] == expected_code and seen["oom_killed"] is False and seen["ready"] is None
    # (a list around the answer: a 503 Response is falsy, which wait_until would take for "not yet")
    (answer,) = wait_until(
        lambda: (r := requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10)).status_code == 503 and [r],
        timeout=5, what="the proxy to answer 503 for the dead service")
    error = error_of(answer, 503, "service_not_running", "llm")
    assert "'llm'" in error["message"] and "exited" in error["message"], error
    assert (error["state"], error["reason"], error["exit_code"]) == ("failed", "container_exited", expected_code)
    assert any("LISTENING 8080" in line for line in error["logs"]), error["logs"]
    listed = {s["service_id"]: s for s in api(proxy, "GET", "/services").json()["services"]}
    assert listed["llm"]["status"] == "exited" and listed["llm"]["exit_code"] == expected_code

    # And it comes back: a start replaces the dead container, and forwarding resumes.
    start_ready(proxy)
    wait_until(lambda: requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 200,
               timeout=5, what="forwarding to resume after the restart")


@pytest.mark.engine
def test_streams_in_flight_when_the_container_dies_end_incomplete(engine_proxy, docker_client, container_prefix):
    """Killed mid-generation: each client's stream breaks off (no [DONE], no clean end of
    the body) soon after, rather than ending as if complete or hanging until a timeout."""
    proxy = engine_proxy()
    start_ready(proxy)
    started = queue.Queue()
    with ThreadPoolExecutor(5) as pool:
        streams = [pool.submit(read_sse, f"{proxy.url}/service/llm/stream", {"events": 1000, "delay": 0.1},
                               lambda: started.put(1), 30) for _ in range(5)]
        for _ in streams:
            started.get(timeout=15)
        docker_client.containers.get(f"{container_prefix}-llm").kill()
        killed = time.monotonic()
        results = [stream.result(timeout=40) for stream in streams]
        ended_after = time.monotonic() - killed
    for result in results:
        assert result["status"] == 200 and result["seqs"], result
        assert result["error"] and not result["done"] and not result["clean_end"], result
        assert "ChunkedEncodingError" in result["error"] or "ProtocolError" in result["error"], result
    assert ended_after < 10, f"the streams hung {ended_after:.1f} s after the container died"
    # The cut can come before Docker's "die" event: until then a request may still get 502.
    (answer,) = wait_until(
        lambda: (r := requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10)).status_code == 503 and [r],
        timeout=5, what="the proxy to answer 503 for the dead service")
    error_of(answer, 503, "service_not_running", "llm")


@pytest.mark.engine
def test_an_oom_killed_container_is_reported_as_such(engine_proxy):
    proxy = engine_proxy({"llm": service_entry(free_port(), resources={"memory": "64m"})})
    start_ready(proxy)
    small = requests.post(f"{proxy.url}/service/llm/_alloc", params={"mb": 8}, timeout=30)
    assert small.status_code == 200 and small.json()["allocated_mb"] == 8  # under the limit: fine

    # Far past the limit: the kernel kills the server while it answers, so the proxy
    # sees the connection dropped before any response.
    answer = requests.post(f"{proxy.url}/service/llm/_alloc", params={"mb": 512}, timeout=60)
    error_of(answer, 502, "upstream_unreachable", "llm")

    seen = wait_until(lambda: (s := status(proxy))["status"] == "exited" and s, timeout=15,
                      what="the status to show the container exited")
    assert seen["oom_killed"] is True and seen["exit_code"] == 137, seen
    (answer,) = wait_until(
        lambda: (r := requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10)).status_code == 503 and [r],
        timeout=5, what="the proxy to answer 503 for the dead service")
    error = error_of(answer, 503, "service_not_running", "llm")
    assert "'llm'" in error["message"]
    assert (error["state"], error["reason"], error["oom_killed"], error["exit_code"]) == \
        ("failed", "oom_killed", True, 137), error
    assert any("LISTENING 8080" in line for line in error["logs"]), error["logs"]  # what the server printed
    assert status(proxy)["state"] == "failed" and status(proxy)["reason"] == "oom_killed"


# -- one service's trouble never reaches another ----------------------------------------------

STREAMS = 50
STREAM_EVENTS = 60
STREAM_DELAY = 0.25  # 15 s per stream


def _other_service_request(proxy, n: int) -> tuple[float, str | None]:
    """One request to the healthy service, in turn each of three kinds; (seconds, problem)."""
    began = time.monotonic()
    base = f"{proxy.url}/service/good"
    try:
        if n % 3 == 0:
            answer = requests.get(f"{base}/v1/models", timeout=10)
            ok = answer.status_code == 200 and answer.json()["data"][0]["id"] == "test-model"
        elif n % 3 == 1:
            answer = requests.post(f"{base}/v1/chat/completions", timeout=10,
                                   json={"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
            ok = answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
        else:
            result = read_sse(f"{base}/stream", {"events": 3, "delay": 0.05}, timeout=10)
            ok = result["status"] == 200 and result["seqs"] == [0, 1, 2] and result["done"] and result["clean_end"]
            answer = result
    except requests.RequestException as exc:
        return time.monotonic() - began, repr(exc)
    return time.monotonic() - began, None if ok else f"request {n}: {getattr(answer, 'text', answer)}"


@pytest.mark.engine
@pytest.mark.timeout(240)
def test_a_failing_a_slow_and_a_busy_service_never_hold_up_another(engine_proxy):
    """In ONE worker (so nothing is spared by landing on another process): a start that
    fails (missing image, again and again), a start that waits 20 s for a slow loader, and
    50 slow streams on a third service, all at once. Every request to a fourth service made
    meanwhile is answered, in full."""
    slow_args = ["--host", "0.0.0.0", "--port", "8080", "--load-seconds", "20"]
    proxy = engine_proxy({
        "good": service_entry(free_port()),
        "busy": service_entry(free_port()),
        "slow": service_entry(free_port(), args=slow_args),
        "missing": service_entry(free_port(), image="inference-proxy-test-missing:none"),
    }, workers=1, log_level="INFO")
    start_ready(proxy, "good")
    start_ready(proxy, "busy")
    baseline = [_other_service_request(proxy, n) for n in range(9)]
    assert [problem for _, problem in baseline] == [None] * 9, baseline

    stop_failing = threading.Event()

    def start_slow():
        return api(proxy, "POST", "/service/slow/start", params={"wait": "true", "timeout": 120}, timeout=150)

    def start_missing_repeatedly():
        answers = []
        while not stop_failing.is_set():
            answers.append(api(proxy, "POST", "/service/missing/start", timeout=30))
            stop_failing.wait(0.5)
        return answers

    with ThreadPoolExecutor(STREAMS + 2) as pool:
        slow = pool.submit(start_slow)
        failing = pool.submit(start_missing_repeatedly)
        streams = [pool.submit(read_sse, f"{proxy.url}/service/busy/stream",
                               {"events": STREAM_EVENTS, "delay": STREAM_DELAY}, None, 60)
                   for _ in range(STREAMS)]
        meanwhile, n = [], 0
        while not (slow.done() and all(s.done() for s in streams)):
            meanwhile.append(_other_service_request(proxy, n))
            n += 1
            time.sleep(0.1)
        stop_failing.set()

        problems = [problem for _, problem in meanwhile if problem]
        assert not problems, problems
        assert len(meanwhile) >= 30, f"only {len(meanwhile)} requests made while the others ran"
        for stream in streams:
            assert_complete(stream.result(), STREAM_EVENTS)
        slow_answer = slow.result()
        assert slow_answer.status_code == 200 and slow_answer.json()["state"] == "ready", slow_answer.text
        failed = failing.result()
        assert failed and all(a.status_code == 500 and a.json()["error"]["code"] == "image_unavailable"
                              for a in failed), [a.text for a in failed]

    # Loosely: the healthy service stayed quick while all that went on.
    before = statistics.median(seconds for seconds, _ in baseline)
    during = statistics.median(seconds for seconds, _ in meanwhile)
    print(f"\nother service: median {before * 1000:.0f} ms before, {during * 1000:.0f} ms during "
          f"({len(meanwhile)} requests, max {max(s for s, _ in meanwhile) * 1000:.0f} ms)")
    assert during < 1.0, f"median latency {during:.2f} s while the others ran"
    assert status(proxy, "good")["status"] == "running"


# -- gunicorn signalled mid-stream -------------------------------------------------------------

SIGNAL_STREAMS = 10
SIGNAL_EVENTS = 30


def _streams_in_flight(proxy, pool: ThreadPoolExecutor) -> list:
    """Start the streams and return once every one has its first event (so it is mid-stream)."""
    started = queue.Queue()
    futures = [pool.submit(read_sse, f"{proxy.url}/service/llm/stream",
                           {"events": SIGNAL_EVENTS, "delay": 0.1}, lambda: started.put(1), 60)
               for _ in range(SIGNAL_STREAMS)]
    deadline = time.monotonic() + 15
    for _ in range(SIGNAL_STREAMS):
        while True:
            ended = [f.result() for f in futures if f.done()]
            assert not ended, f"a stream ended before the signal, so it was not in flight: {ended}"
            try:
                started.get(timeout=0.1)
                break
            except queue.Empty:
                assert time.monotonic() < deadline, "the streams did not start within 15 s"
    return futures


def test_sighup_lets_in_flight_streams_finish_and_new_workers_serve(backend, start_proxy):
    proxy = start_proxy({"llm": service_entry(backend.port)}, workers=2,
                        env={"PROXY_GRACEFUL_TIMEOUT": "60"}, log_level="INFO")
    old_workers = worker_pids(proxy)
    assert len(old_workers) == 2
    with ThreadPoolExecutor(SIGNAL_STREAMS) as pool:
        streams = _streams_in_flight(proxy, pool)
        proxy.proc.send_signal(signal.SIGHUP)
        # New workers come up and serve while the old ones still finish their streams.
        wait_until(lambda: worker_pids(proxy) - old_workers, timeout=15, what="new workers after SIGHUP")
        for _ in range(10):
            answer = requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10)
            assert answer.status_code == 200, answer.text
        for stream in streams:
            assert_complete(stream.result(timeout=60), SIGNAL_EVENTS)

    wait_until(lambda: not (worker_pids(proxy) & old_workers), timeout=20, what="the old workers to exit")
    assert len(worker_pids(proxy)) == 2 and proxy.proc.poll() is None
    for _ in range(10):
        assert requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 200
    assert_complete(read_sse(f"{proxy.url}/service/llm/stream", {"events": 3, "delay": 0.05}), 3)


def test_sigterm_lets_in_flight_streams_finish_then_exits_zero(backend, start_proxy):
    proxy = start_proxy({"llm": service_entry(backend.port)}, workers=2,
                        env={"PROXY_GRACEFUL_TIMEOUT": "60"}, log_level="INFO")
    with ThreadPoolExecutor(SIGNAL_STREAMS) as pool:
        streams = _streams_in_flight(proxy, pool)
        proxy.proc.send_signal(signal.SIGTERM)
        for stream in streams:
            assert_complete(stream.result(timeout=60), SIGNAL_EVENTS)
    assert proxy.proc.wait(timeout=30) == 0, proxy.log()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{proxy.url}/healthz", timeout=5)
