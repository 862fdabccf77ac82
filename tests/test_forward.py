"""The streaming reverse proxy, end to end: a real backend process behind the proxy under
real gunicorn. The proxy sees no Docker engine here, so it forwards without knowing
container states (engine tests cover 503 for a stopped container)."""
from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import socket
import time
import uuid

import openai
import pytest
import requests

from conftest import free_port, recv_until, service_entry, wait_until

MB = 1024 * 1024


@pytest.fixture(scope="module")
def routed(module_launchers):
    """A proxy with service 'llm' pointing at a backend process, shared by the module."""
    start_backend, start_proxy = module_launchers
    backend = start_backend()
    # Reached by other names too, as behind a front end: those names must be allowed hosts.
    proxy = start_proxy({"llm": service_entry(backend.port, timeouts={"connect": 2, "read": 5})},
                        server_extra={"allowed_hosts": ["example.test", "front.example"]})
    return proxy, backend


def _echo(proxy, path: str, method: str = "GET", **kwargs) -> dict:
    answer = requests.request(method, f"{proxy.url}/service/llm{path}", timeout=10, **kwargs)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _raw_request(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request)
    return sock


def _proxy_error(answer, status: int, code: str) -> dict:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["code"] == code and error["source"] == "proxy" and error["service_id"] == "llm"
    return error


# -- request semantics --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_is_forwarded_with_its_body(routed, method):
    proxy, _ = routed
    echoed = _echo(proxy, "/echo/x", method=method, data=b"payload")
    assert echoed["method"] == method
    assert echoed["body"] == "payload"


def test_head_is_forwarded_without_a_body(routed):
    proxy, _ = routed
    answer = requests.head(f"{proxy.url}/service/llm/echo", timeout=10)
    assert answer.status_code == 200 and answer.content == b""


def test_percent_encoding_and_query_reach_the_backend_byte_for_byte(routed):
    proxy, _ = routed
    sock = _raw_request(proxy.port, b"GET /service/llm/echo/a%2Fb%20c/%E2%82%AC?q=%2F&x=1&x=2&sp=a+b HTTP/1.1\r\n"
                                    b"Host: example.test\r\nConnection: close\r\n\r\n")
    response = http.client.HTTPResponse(sock)
    response.begin()
    echoed = json.loads(response.read())
    sock.close()
    assert echoed["raw_path"] == "/echo/a%2Fb%20c/%E2%82%AC"
    assert echoed["query"] == "q=%2F&x=1&x=2&sp=a+b"


@pytest.mark.parametrize("path", ["", "/"])
def test_service_root_maps_to_backend_root(routed, path):
    proxy, _ = routed
    answer = requests.get(f"{proxy.url}/service/llm{path}", timeout=10)
    # The test backend has no "/" route: its own 404 names the path it was asked for.
    assert answer.status_code == 404
    assert "File Not Found: /" in answer.json()["error"]["message"]
    assert "source" not in answer.json()["error"]


def test_headers_lose_hop_by_hop_and_gain_forwarding_ones(routed):
    proxy, backend = routed
    echoed = _echo(proxy, "/echo", headers={
        "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Authorization": "Basic x", "X-Keep-Me": "yes",
        "X-Forwarded-For": "10.9.8.7", "Host": "front.example:8443"})
    headers = {name.lower(): value for name, value in echoed["headers"]}
    for dropped in ("x-drop-me", "keep-alive", "te", "proxy-authorization"):
        assert dropped not in headers
    assert headers.get("connection", "keep-alive").lower() == "keep-alive"  # urllib3's own, not the client's
    assert headers["x-keep-me"] == "yes"
    assert headers["x-forwarded-for"] == "127.0.0.1"  # the client's own claim is dropped: no trusted proxy
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "front.example:8443"
    assert headers["host"] == f"127.0.0.1:{backend.port}"


def test_streamed_upload_with_length_arrives_intact(routed):
    proxy, _ = routed
    body = bytes(range(256)) * 4096 + b"tail"
    answer = requests.post(f"{proxy.url}/service/llm/upload", data=body, timeout=30)
    assert answer.json() == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_chunked_upload_arrives_intact(routed):
    proxy, _ = routed
    parts = [b"a" * 1000, b"b" * 70000, b"c"]
    answer = requests.post(f"{proxy.url}/service/llm/upload", data=iter(parts), timeout=30)
    whole = b"".join(parts)
    assert answer.json() == {"bytes": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}


# -- response semantics -------------------------------------------------------------------

def test_repeated_response_headers_are_kept(routed):
    proxy, _ = routed
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request("GET", "/service/llm/cookies")
    response = connection.getresponse()
    response.read()
    assert response.headers.get_all("Set-Cookie") == ["a=1", "b=2", "c=3"]
    assert response.headers.get_all("X-Multi") == ["one", "two"]
    connection.close()


def test_gzip_bytes_and_encoding_pass_through_unchanged(routed):
    proxy, _ = routed
    direct = requests.get(f"{routed[1].url}/gzip", stream=True, timeout=10)
    proxied = requests.get(f"{proxy.url}/service/llm/gzip", stream=True, timeout=10)
    assert proxied.headers["Content-Encoding"] == "gzip"
    raw = proxied.raw.read(decode_content=False)
    assert raw == direct.raw.read(decode_content=False)
    assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == proxied.headers["X-Uncompressed-Sha256"]


def test_backend_error_status_and_body_pass_through_untouched(routed):
    proxy, backend = routed
    proxied = requests.get(f"{proxy.url}/service/llm/status/418", timeout=10)
    direct = requests.get(f"{backend.url}/status/418", timeout=10)
    assert proxied.status_code == 418
    assert proxied.content == direct.content


def test_connections_to_the_backend_are_pooled(routed):
    proxy, backend = routed
    before = backend.stats()["connections_accepted"]
    with requests.Session() as client:
        for _ in range(20):
            assert client.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 200
    assert backend.stats()["connections_accepted"] - before <= 2


def test_environment_proxy_variables_never_apply_to_backends(backend, start_proxy, free_dead_port):
    dead = f"http://127.0.0.1:{free_dead_port}"
    proxy = start_proxy({"llm": service_entry(backend.port)},
                        env={"HTTP_PROXY": dead, "http_proxy": dead, "ALL_PROXY": dead, "NO_PROXY": ""})
    assert requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10).status_code == 200


@pytest.fixture
def free_dead_port():
    return free_port()


# -- streaming ------------------------------------------------------------------------------

def _sse_events(response):
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event.startswith(b"data: ") and event != b"data: [DONE]":
                yield json.loads(event[6:]), time.time()


def test_sse_events_arrive_as_they_are_sent_not_at_the_end(routed):
    proxy, _ = routed
    response = requests.get(f"{proxy.url}/service/llm/stream", params={"events": 6, "delay": 0.3},
                            stream=True, timeout=10)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    received = list(_sse_events(response))
    assert [event["seq"] for event, _ in received] == list(range(6))
    # Each event reached us before the backend had even sent the next one.
    for (_, arrived), (next_event, _) in zip(received, received[1:]):
        assert arrived < next_event["sent_at"]


def test_openai_sdk_chat_completion_streamed_and_not(routed):
    proxy, _ = routed
    client = openai.OpenAI(base_url=f"{proxy.url}/service/llm/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(model="test-model", max_tokens=5,
                                                messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content.split() == [f"tok{i}" for i in range(5)]
    stream = client.chat.completions.create(model="test-model", max_tokens=7, stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.split() == [f"tok{i}" for i in range(7)]


def test_large_download_streams_in_constant_memory(routed, proxy_rss):
    proxy, _ = routed
    size = 100 * MB
    before = proxy_rss(proxy)
    digest, received = hashlib.sha256(), 0
    with requests.get(f"{proxy.url}/service/llm/download", params={"bytes": size, "mode": "chunked"},
                      stream=True, timeout=60) as response:
        for chunk in response.iter_content(chunk_size=1 * MB):
            received += len(chunk)
            digest.update(chunk)
    assert received == size
    assert proxy_rss(proxy) - before < 10 * MB


def test_large_upload_streams_in_constant_memory(routed, proxy_rss):
    proxy, _ = routed
    before = proxy_rss(proxy)
    answer = requests.post(f"{proxy.url}/service/llm/upload", data=_Pattern(100 * MB), timeout=60)
    assert answer.json()["bytes"] == 100 * MB
    assert proxy_rss(proxy) - before < 10 * MB


class _Pattern:
    """A sized body made on the fly, so the test client itself stays small."""

    def __init__(self, size: int):
        self.left = size

    def __len__(self) -> int:
        return self.left

    def read(self, n: int = -1) -> bytes:
        n = min(self.left, MB if n is None or n < 0 else n)
        self.left -= n
        return b"x" * n


@pytest.fixture
def proxy_rss():
    """Resident memory of the proxy's worker processes, in bytes."""
    def measure(proxy) -> int:
        master = proxy.proc.pid
        children = open(f"/proc/{master}/task/{master}/children").read().split()
        total = 0
        for pid in children:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total
    return measure


# -- disconnects and failures ----------------------------------------------------------------

def _chat_request(port: int, test_id: str, query: str = "") -> socket.socket:
    body = json.dumps({"model": "m", "stream": True, "max_tokens": 1000,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return _raw_request(port, (f"POST /service/llm/v1/chat/completions{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               f"X-Test-Id: {test_id}\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(body)}\r\n\r\n").encode() + body)


def test_client_leaving_before_the_first_byte_closes_the_upstream(routed):
    proxy, backend = routed
    test_id = uuid.uuid4().hex
    sock = _chat_request(proxy.port, test_id, "?first_byte_delay=60")
    time.sleep(0.5)  # the request is with the backend, which is still "reading the prompt"
    sock.close()
    left = wait_until(lambda: backend.disconnects(test_id), timeout=3, what="the backend to see the client leave")
    assert left[0]["phase"] == "before_first_byte"


def test_client_leaving_mid_stream_closes_the_upstream(routed):
    proxy, backend = routed
    test_id = uuid.uuid4().hex
    sock = _chat_request(proxy.port, test_id, "?delay=0.5")
    recv_until(sock, b"data: ")  # the first token is here
    sock.close()
    left = wait_until(lambda: backend.disconnects(test_id), timeout=3, what="the backend to see the client leave")
    assert left[0]["phase"] == "mid_stream"


def test_backend_dying_mid_stream_ends_the_client_response_incomplete(routed):
    proxy, _ = routed
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        with requests.get(f"{proxy.url}/service/llm/die", params={"events": 3}, stream=True, timeout=10) as response:
            assert response.status_code == 200
            for _ in response.iter_content(chunk_size=None):
                pass
    wait_until(lambda: "broke off mid-response" in proxy.log(), timeout=5, what="the log line")


def test_unknown_service_is_404_in_the_envelope(routed):
    proxy, _ = routed
    answer = requests.get(f"{proxy.url}/service/nope/v1/models", timeout=10)
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "service_not_found" and error["service_id"] == "nope" and error["source"] == "proxy"


def test_refused_connection_is_502(start_proxy, free_dead_port):
    proxy = start_proxy({"llm": service_entry(free_dead_port)})
    _proxy_error(requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10), 502, "upstream_unreachable")


def test_no_response_headers_within_read_timeout_is_504(backend, start_proxy):
    proxy = start_proxy({"llm": service_entry(backend.port, timeouts={"connect": 2, "read": 1})})
    _proxy_error(requests.get(f"{proxy.url}/service/llm/hang", timeout=10), 504, "upstream_timeout")
