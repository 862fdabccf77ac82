"""Slow and large request bodies, through real gunicorn: a body that stops coming, a JSON
body the front door must not hold, and lengths no buffer could take.

One proxy (one worker) is shared by the module. Service 'raw' is a raw-socket backend that
reads and never answers (it records when each of its connections closes); 'llm' and
'capped' are the stdlib test backend, 'capped' with a max_body_size.
"""
from __future__ import annotations

import json
import socket
import time
import uuid

import pytest

from conftest import service_entry, wait_until
from raw_backend import RawBackend

BODY_TIMEOUT = 2.0  # seconds; server.body_timeout of the shared proxy
MAX_JSON_BODY = 64 * 1024
MAX_BUFFERED = 100 * 1024


@pytest.fixture(scope="module")
def raw_backend():
    backend = RawBackend(answer=None)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def proxy(module_launchers, raw_backend):
    start_backend, start_proxy = module_launchers
    services = {"raw": service_entry(raw_backend.port, timeouts={"connect": 2, "read": 30}),
                "llm": service_entry(start_backend().port),
                "capped": service_entry(start_backend().port, max_body_size="1m")}
    server = {"body_timeout": f"{BODY_TIMEOUT:g}s", "max_json_body": "64k", "max_buffered": "100k"}
    return start_proxy(services, workers=1, server_extra=server, log_level="INFO")


def _connect(proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=15)


def _send(proxy, request: bytes) -> tuple[int, dict, bytes]:
    with _connect(proxy) as sock:
        sock.sendall(request)
        return _answer(sock)


def _answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Read one answer to its end (Content-Length framed, as the proxy's errors are)."""
    received = b""
    while b"\r\n\r\n" not in received:
        data = sock.recv(65536)
        assert data, f"closed before an answer: {received!r}"
        received += data
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        data = sock.recv(65536)
        assert data, "closed mid-answer"
        body += data
    return int(lines[0].split()[1]), headers, body


def _error(answer, status: int, code: str) -> dict:
    got, headers, body = answer
    assert got == status, body[:500]
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["source"] == "proxy", error
    return error


def _closed_by_proxy(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- a body that stops coming -------------------------------------------------------------------

STALLS = {
    # name: (target, headers, the part of the body sent before the client stops, whether the
    # proxy has begun sending it upstream by then)
    "streamed_upload": ("/service/raw/upload", "Content-Length: 1048576", b"x" * 200_000, True),
    "small_body": ("/service/raw/upload", "Content-Length: 1000", b"x" * 10, False),  # read whole first
    "chunked_upload": ("/service/raw/upload", "Transfer-Encoding: chunked", b"1000\r\n" + b"x" * 100, True),
    "front_door_json": ("/v1/chat/completions", "Content-Length: 1000", b'{"model": "raw", "messages": [', False),
}


@pytest.mark.parametrize("target, framing, part, upstream_open", STALLS.values(), ids=STALLS.keys())
def test_a_body_that_stops_coming_is_408_and_its_connections_are_closed(proxy, raw_backend, target, framing,
                                                                         part, upstream_open):
    test_id = uuid.uuid4().hex
    sock = _connect(proxy)
    sock.sendall(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Test-Id: {test_id}\r\n{framing}\r\n\r\n".encode() + part)
    stalled = time.monotonic()
    answer = _answer(sock)
    waited = time.monotonic() - stalled
    error = _error(answer, 408, "body_timeout")
    assert error["type"] == "invalid_request_error"
    assert BODY_TIMEOUT - 0.5 <= waited < BODY_TIMEOUT + 5, waited
    assert _closed_by_proxy(sock), "the connection stayed open after the 408"
    sock.close()
    upstream = raw_backend.connection_with(test_id.encode())
    assert (upstream is not None) == upstream_open
    if upstream_open:  # the body was on its way up: that connection is dropped too
        wait_until(lambda: upstream.ended_at is not None, timeout=5, what="the upstream connection to close")


def test_a_body_that_keeps_coming_slowly_is_not_cut(proxy):
    body = json.dumps({"model": "llm", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = _connect(proxy)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode())
    for piece in (body[:10], body[10:20], body[20:]):  # pauses shorter than body_timeout, longer in total
        time.sleep(BODY_TIMEOUT * 0.6)
        sock.sendall(piece)
    status, _, answer = _answer(sock)
    sock.close()
    assert status == 200, answer
    assert json.loads(answer)["choices"][0]["message"]["content"].split() == ["tok0", "tok1"]


# -- the front door's JSON bodies ----------------------------------------------------------------

def test_a_json_body_over_max_json_body_is_413_before_a_byte_of_it_is_read(proxy):
    sock = _connect(proxy)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {MAX_JSON_BODY + 1}\r\n\r\n"
                 .encode())  # and no body: reading one would end in a 408, not this
    error = _error(_answer(sock), 413, "body_too_large")
    sock.close()
    assert str(MAX_JSON_BODY) in error["message"]


def _chat_body(size: int) -> bytes:
    """A valid chat request for 'llm' of exactly ``size`` bytes."""
    start = b'{"model": "llm", "max_tokens": 1, "messages": [{"role": "user", "content": "'
    end = b'"}]}'
    return start + b"a" * (size - len(start) - len(end)) + end


def test_a_worker_holding_max_buffered_bytes_of_bodies_refuses_more_with_503(proxy):
    size = 60 * 1024  # two of these are more than max_buffered (100 KiB)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n"
            f"Connection: close\r\n\r\n").encode()
    body = _chat_body(size)
    first = _connect(proxy)
    first.sendall(head + body[:1000])  # its whole length is held while it comes
    time.sleep(0.3)
    with _connect(proxy) as second:
        second.sendall(head + body)
        status, headers, answer = _answer(second)
    assert status == 503, answer
    assert json.loads(answer)["error"]["code"] == "server_busy"
    assert headers["retry-after"] == "1"
    first.sendall(body[1000:])
    status, _, answer = _answer(first)
    first.close()
    assert status == 200, answer
    with _connect(proxy) as third:  # the first body's share was given back with its answer
        third.sendall(head + body)
        status, _, answer = _answer(third)
    assert status == 200, answer


def test_json_nested_a_thousand_levels_deep_is_400_invalid_json(proxy):
    body = b'{"model": "llm", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
               f"Connection: close\r\n\r\n").encode() + body
    status, _, payload = _send(proxy, request)
    assert status == 400, payload[:500]
    assert json.loads(payload)["error"]["code"] == "invalid_json"


# -- lengths no buffer could take ----------------------------------------------------------------

@pytest.mark.parametrize("length", [2 ** 63, 2 ** 64, int("9" * 40)], ids=["2^63", "2^64", "40_digits"])
@pytest.mark.parametrize("method, target", [
    ("POST", "/service/capped/upload"), ("POST", "/service/llm/upload"), ("POST", "/v1/chat/completions"),
    ("POST", "/api/v1/service/llm/start"), ("GET", "/api/v1/services"), ("GET", "/healthz"), ("POST", "/nope"),
])
def test_a_content_length_of_two_to_the_63_or_more_is_refused_on_every_route(proxy, method, target, length):
    request = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\nConnection: close\r\n\r\nabc"
    status, headers, payload = _send(proxy, request.encode())
    assert status in (400, 413), payload[:500]
    assert headers["content-type"] == "application/json"
    assert json.loads(payload)["error"]["source"] == "proxy"
    assert "Traceback" not in proxy.log()
