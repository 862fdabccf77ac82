"""The wire between client, proxy and backend, through real gunicorn: answers framed right
whatever the backend sends, interim answers skipped, a half-closed client still answered,
fragments kept home, and forwarding headers believed only from a trusted front proxy.

Backends: the stdlib test backend as a process, and raw-socket backends for answers no
well-behaved server gives.
"""
from __future__ import annotations

import http.client
import io
import json
import socket
import time
import uuid

import pytest
import requests

from conftest import service_entry, wait_until
from raw_backend import RawBackend

BOTH_FRAMINGS = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
EARLY_HINTS_FIRST = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello")


@pytest.fixture(scope="module")
def raw_backends():
    backends = {"framing": RawBackend(BOTH_FRAMINGS), "hints": RawBackend(EARLY_HINTS_FIRST)}
    yield backends
    for backend in backends.values():
        backend.close()


@pytest.fixture(scope="module")
def routed(module_launchers, raw_backends):
    """(proxy, stdlib backend): services 'llm' (the stdlib backend), 'framing' and 'hints'."""
    start_backend, start_proxy = module_launchers
    backend = start_backend()
    services = {"llm": service_entry(backend.port),
                **{name: service_entry(raw.port, timeouts={"connect": 2, "read": 5})
                   for name, raw in raw_backends.items()}}
    # front.example: the name a front proxy would pass on, allowed so the forwarding headers can be seen
    return start_proxy(services, log_level="INFO", server_extra={"allowed_hosts": ["front.example"]}), backend


def _responses(received: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of every response in bytes read from one connection, in order."""
    stream = _Unclosable(received)
    answers = []
    while stream.tell() < len(received):
        response = http.client.HTTPResponse(_Received(stream))
        response.begin()  # skips 100 Continue, as every HTTP/1.1 client must
        answers.append((response.status, response.read()))
    return answers


class _Unclosable(io.BytesIO):
    def close(self) -> None:  # http.client closes what it read a response from: the next one follows
        pass


class _Received:
    def __init__(self, stream):
        self._stream = stream

    def makefile(self, *args, **kwargs):
        return self._stream


def _read_to_close(sock: socket.socket) -> bytes:
    received = b""
    while data := sock.recv(65536):
        received += data
    return received


# -- response framing and odd answers -------------------------------------------------------------

def test_a_backend_length_beside_chunking_never_reaches_the_client(routed):
    proxy, _ = routed
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        # Two requests on one kept-alive connection: the second answer must not be read as
        # the rest of the first one's body.
        sock.sendall(b"GET /service/framing/a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     b"GET /service/framing/b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = _read_to_close(sock)
    first_head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert b"content-length: 100" not in first_head
    assert _responses(received) == [(200, b"hello"), (200, b"hello")]


def test_an_interim_103_from_the_backend_is_skipped_for_the_real_answer(routed):
    proxy, _ = routed
    answer = requests.get(f"{proxy.url}/service/hints/x", timeout=10)
    assert (answer.status_code, answer.text) == (200, "hello")
    answer = requests.get(f"{proxy.url}/service/hints/y", timeout=10)  # the pooled connection is still in step
    assert (answer.status_code, answer.text) == (200, "hello")


# -- a client that half-closes ----------------------------------------------------------------------

def _chat(target: str, stream: bool, version: str = "HTTP/1.1", model: str = "m") -> bytes:
    body = json.dumps({"model": model, "stream": stream, "max_tokens": 3,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (f"POST {target} {version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@pytest.mark.parametrize("target", ["/service/llm/v1/chat/completions?first_byte_delay=1",
                                    "/v1/chat/completions?first_byte_delay=1"], ids=["service", "front_door"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(routed, target, stream, version):
    proxy, _ = routed
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(_chat(target, stream, version, model="llm"))
        sock.shutdown(socket.SHUT_WR)  # done sending; still reading
        received = _read_to_close(sock)
    ((status, body),) = _responses(received)
    assert status == 200, body
    text = body.decode()
    assert all(f"tok{i}" in text for i in range(3)), text
    if stream:
        assert text.rstrip().endswith("data: [DONE]")


def test_a_client_that_closes_before_the_first_token_still_cuts_its_backend_off(routed):
    proxy, backend = routed
    test_id = uuid.uuid4().hex
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(_chat("/service/llm/v1/chat/completions?first_byte_delay=60", stream=True)
                 .replace(b"Host: 127.0.0.1\r\n", f"Host: 127.0.0.1\r\nX-Test-Id: {test_id}\r\n".encode()))
    sock.shutdown(socket.SHUT_WR)  # first a half-close, which is no reason to cut...
    time.sleep(0.5)  # the request is with the backend, which is still "reading the prompt"
    sock.close()  # ...then really gone
    left = wait_until(lambda: backend.disconnects(test_id), timeout=3, what="the backend to see the client leave")
    assert left[0]["phase"] == "before_first_byte"


# -- fragments ---------------------------------------------------------------------------------

def test_a_fragment_in_the_target_is_not_forwarded(routed):
    proxy, _ = routed
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET /service/llm/echo/x?q=1#frag HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        ((status, body),) = _responses(_read_to_close(sock))
    echo = json.loads(body)
    assert (status, echo["raw_path"], echo["query"]) == (200, "/echo/x", "q=1")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(_chat("/v1/no-such-route#frag", stream=False, model="llm"))
        ((status, body),) = _responses(_read_to_close(sock))
    # The backend's own 404 names the path it was asked for.
    assert (status, json.loads(body)["error"]["message"]) == (404, "File Not Found: /v1/no-such-route")


# -- forwarding headers and trusted proxies ------------------------------------------------------

CLAIMS = {"X-Forwarded-For": "10.9.8.7", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "claimed.example",
          "Forwarded": "for=10.9.8.7;proto=https"}


def _echoed_headers(proxy, headers: dict, path: str = "/service/llm/echo/x") -> dict:
    answer = requests.get(f"{proxy.url}{path}", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["raw_path"] == "/echo/x"
    return {name.lower(): value for name, value in answer.json()["headers"]}


def test_forwarding_headers_from_a_client_that_is_no_trusted_proxy_are_replaced(routed):
    proxy, _ = routed
    headers = _echoed_headers(proxy, {**CLAIMS, "Host": "front.example"})
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "front.example"
    assert "forwarded" not in headers


def test_forwarding_headers_from_a_trusted_proxy_are_kept(start_proxy, start_backend):
    proxy = start_proxy({"llm": service_entry(start_backend().port)}, log_level="INFO",
                        server_extra={"trusted_proxies": ["127.0.0.1"]})
    headers = _echoed_headers(proxy, CLAIMS)
    assert headers["x-forwarded-for"] == "10.9.8.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"  # gunicorn believed it: the scheme is https
    assert headers["x-forwarded-host"] == "claimed.example"
    assert headers["forwarded"] == CLAIMS["Forwarded"]


@pytest.mark.parametrize("trusted", [[], ["127.0.0.1"]], ids=["from_anyone", "from_a_trusted_proxy"])
def test_script_name_and_path_info_headers_never_change_routing(start_proxy, start_backend, trusted):
    proxy = start_proxy({"llm": service_entry(start_backend().port)}, log_level="INFO",
                        server_extra={"trusted_proxies": trusted})
    for header in ["SCRIPT_NAME: /nope", "SCRIPT_NAME: /service/llm", "PATH_INFO: /api/v1/services",
                   "SCRIPT-NAME: /service"]:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(f"GET /service/llm/echo/x HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}\r\nConnection: close\r\n\r\n"
                         .encode())
            ((status, body),) = _responses(_read_to_close(sock))
        assert status == 200, (header, body[:300])
        assert json.loads(body)["raw_path"] == "/echo/x", header
