"""Malformed and hostile HTTP, sent as raw bytes to the proxy under real gunicorn with a
backend process behind service 'llm'.

Whatever comes in, the answer is a 4xx (the proxy's JSON envelope, or gunicorn's own page
when gunicorn refuses the request before the app sees it), or the configured backend's own
answer; never a 5xx, never a traceback in the body or the log, and nothing ever reaches
another host or port (a decoy listener named in every trick must see no connection).
After each test the proxy still serves (the ``proxy`` fixture checks).
"""
from __future__ import annotations

import http.client
import io
import json
import socket

import pytest
import requests

from conftest import service_entry


@pytest.fixture(scope="module")
def decoy():
    """A listener that nothing may ever reach: its address goes into every trick."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        yield f"127.0.0.1:{sock.getsockname()[1]}"
        try:
            connection, _ = sock.accept()
        except BlockingIOError:
            return
        connection.close()
        pytest.fail("a request reached the decoy listener: the proxy forwarded off its backend")


@pytest.fixture(scope="module")
def shared(module_launchers, decoy):
    start_backend, start_proxy = module_launchers
    backend = start_backend()
    # Every Host let in, so the Host tricks below reach the forwarder, which must never use
    # Host to pick a target (the Host check itself: test_hosts_and_origins.py).
    proxy = start_proxy({"llm": service_entry(backend.port, timeouts={"connect": 2, "read": 5})},
                        server_extra={"allowed_hosts": ["*"]})
    return proxy, backend


@pytest.fixture
def proxy(shared):
    """The shared proxy; afterwards it must still forward, and its log must hold no traceback."""
    proxy, _ = shared
    log_start = proxy.log_path.stat().st_size
    yield proxy
    assert proxy.proc.poll() is None, "the proxy died"
    assert requests.get(f"{proxy.url}/service/llm/echo", timeout=10).status_code == 200, "the proxy stopped serving"
    with open(proxy.log_path, "rb") as log:
        log.seek(log_start)
        assert b"Traceback" not in log.read()


@pytest.fixture
def llm_backend(shared):
    return shared[1]


class _Received:
    """Bytes already read from a socket, for http.client to parse as a response."""

    def __init__(self, data: bytes):
        self._data = data

    def makefile(self, *args, **kwargs):
        return io.BytesIO(self._data)


def send_raw(proxy, request: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Send bytes as they are, read until the proxy closes; (status, headers, body)."""
    received = b""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # refused mid-send (an oversized request): the answer may still be there
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    assert received, "the connection closed without an answer"
    response = http.client.HTTPResponse(_Received(received))
    response.begin()
    return response.status, response.headers, response.read()


def get(target: str, *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    """A raw request; 'Host: proxy.test' and 'Connection: close' unless headers say otherwise."""
    lines = [f"{method} {target} HTTP/1.1", *headers]
    if not any(h.lower().startswith("host:") for h in headers):
        lines.append("Host: proxy.test")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def proxy_error(answer, status: int, code: str) -> dict:
    got, headers, body = answer
    assert got == status, body[:500]
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["source"] == "proxy"
    return error


def echoed(answer, backend) -> dict:
    """The test backend's /echo answer: it proves the request reached that backend."""
    status, _, body = answer
    assert status == 200, body[:500]
    echo = json.loads(body)
    headers = {name.lower(): value for name, value in echo["headers"]}
    assert headers["host"] == f"127.0.0.1:{backend.port}"
    return echo


def backend_not_found(answer) -> str:
    """The backend's own 404 (not the proxy's): the path the backend was asked for."""
    status, _, body = answer
    assert status == 404, body[:500]
    error = json.loads(body)["error"]
    assert "source" not in error, "the proxy answered, not the backend"
    return error["message"].removeprefix("File Not Found: ")


# -- what gunicorn refuses before the app ------------------------------------------------------

REFUSED_BY_GUNICORN = {
    "header_line_100kb": get("/service/llm/echo", "X-Big: " + "a" * 100_000),
    "two_hundred_headers": get("/service/llm/echo", *(f"X-H{i}: v" for i in range(200))),
    "request_line_10kb": get("/service/llm/echo/" + "a" * 10_000),
    "query_10kb": get("/service/llm/echo?q=" + "a" * 10_000),
    "service_id_10kb": get("/service/" + "l" * 10_000 + "/x"),
    "header_name_with_space": get("/service/llm/echo", "Bad Header: y"),
    "nul_in_header_value": get("/service/llm/echo", "X-A: a\x00b"),
    "utf8_bytes_in_target": get("/service/ll\u00e9m/x").replace(b"ll\xe9m", "llém".encode()),
    "raw_ff_in_target": get("/service/llm/echo\u00ff"),
    "http_9_9": get("/service/llm/echo").replace(b"HTTP/1.1", b"HTTP/9.9", 1),
    "control_byte_in_method": get("/service/llm/echo", method="G\x01T"),
    "no_http_version": b"GET /service/llm/echo\r\n\r\n",
    "empty_request_line": b"\r\n\r\n",
    "asterisk_target": get("*"),
    "content_length_not_a_number": get("/service/llm/echo", "Content-Length: abc", method="POST"),
    "content_length_negative": get("/service/llm/echo", "Content-Length: -5", method="POST"),
    "two_content_lengths": get("/service/llm/echo", "Content-Length: 5", "Content-Length: 6", method="POST",
                               body=b"hello!"),
    "chunked_and_content_length": get("/service/llm/echo", "Transfer-Encoding: chunked", "Content-Length: 5",
                                      method="POST", body=b"0\r\n\r\n"),
}


@pytest.mark.parametrize("request_bytes", REFUSED_BY_GUNICORN.values(), ids=REFUSED_BY_GUNICORN.keys())
def test_requests_gunicorn_refuses_get_a_4xx_and_never_reach_the_backend(proxy, llm_backend, request_bytes):
    before = llm_backend.stats()["requests"]
    status, _, body = send_raw(proxy, request_bytes)
    assert 400 <= status < 500, body[:500]
    assert b"Traceback" not in body
    assert llm_backend.stats()["requests"] == before + 1  # only the second stats call itself


# -- odd service ids and paths: the proxy's envelope ------------------------------------------

@pytest.mark.parametrize("target,service_id", [
    ("/service/ll%00m/x", "ll\x00m"),
    ("/service/LLM/x", "LLM"),
    ("/service/%zz/x", "%zz"),
    ("/service/%ff/x", None),  # what %ff decodes to is the WSGI stack's business; it is no service
    ("/service/llm%00/x", "llm\x00"),
    ("/service/llm%20/x", "llm "),
    ("/service/%2e%2e/x", ".."),
    ("/service/llm@{decoy}/echo", "llm@{decoy}"),
    ("/service/{decoy}/echo", "{decoy}"),
])
def test_unknown_service_ids_are_404_in_the_envelope(proxy, decoy, target, service_id):
    error = proxy_error(send_raw(proxy, get(target.format(decoy=decoy))), 404, "service_not_found")
    if service_id is not None:
        assert error["service_id"] == service_id.format(decoy=decoy)


@pytest.mark.parametrize("target,status,code", [
    ("/service/llm%2fecho/x", 400, "invalid_path"),  # the id in the raw path is not 'llm'
    ("/service/llm%2F..%2F..%2Fapi/v1/services", 400, "invalid_path"),
    ("//service/llm/echo", 400, "invalid_path"),  # routed as /service/llm/echo, but the raw path differs
    ("//{decoy}/service/llm/echo", 404, "not_found"),
    ("/service/llm//{decoy}/echo", 404, "not_found"),
    ("/service//llm/echo", 404, "not_found"),
    ("/service/", 404, "not_found"),
    ("/api/v1/nope", 404, "not_found"),
    ("/api/v1/container/ll%00m", 404, "service_not_found"),
    ("/api/v1/container/%ff", 404, "service_not_found"),
    ("/api/v1/service/%zz/start", 405, "method_not_allowed"),
])
def test_odd_paths_get_a_4xx_in_the_envelope(proxy, decoy, target, status, code):
    proxy_error(send_raw(proxy, get(target.format(decoy=decoy))), status, code)


# -- dot segments and encodings reach only the configured backend -----------------------------

@pytest.mark.parametrize("target,received", [
    ("/service/llm/echo/../../api/v1/services", "/echo/../../api/v1/services"),
    ("/service/llm/echo/%2e%2e/%2e%2e/etc/passwd", "/echo/%2e%2e/%2e%2e/etc/passwd"),
    ("/service/llm/echo/..%2f..%2fapi", "/echo/..%2f..%2fapi"),
    ("/service/llm/echo//{decoy}/x", "/echo//{decoy}/x"),
    ("/service/llm/echo/%zz", "/echo/%zz"),
    ("/service/llm/echo/%5c%5c{decoy}", "/echo/%5c%5c{decoy}"),
    ("/service/%6c%6c%6d/echo/x", "/echo/x"),  # 'llm', percent-encoded, is still llm
    ("/service/llm/echo/@{decoy}", "/echo/@{decoy}"),
])
def test_dot_segments_and_odd_encodings_reach_only_the_backend(proxy, llm_backend, decoy, target, received):
    echo = echoed(send_raw(proxy, get(target.format(decoy=decoy))), llm_backend)
    assert echo["raw_path"] == received.format(decoy=decoy)


@pytest.mark.parametrize("target,received", [
    ("/service/llm/../api/v1/services", "/../api/v1/services"),
    ("/service/llm/%2e%2e/%2e%2e/etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"),
    ("/service/llm/..", "/.."),
    ("/service/llm", "/"),
])
def test_paths_outside_the_backend_root_are_asked_of_the_backend_as_sent(proxy, target, received):
    # The backend's own 404 names what it was asked: never the proxy's admin API, never a file.
    assert backend_not_found(send_raw(proxy, get(target))) == received


@pytest.mark.parametrize("target", ["/echo/%2e%2e/x", "/echo/%zz", "/echo?q=%zz&a=%2f", "/echo/a%2fb"])
def test_percent_escapes_reach_the_backend_byte_for_byte(proxy, llm_backend, target):
    echo = echoed(send_raw(proxy, get("/service/llm" + target)), llm_backend)
    path, _, query = target.partition("?")
    assert (echo["raw_path"], echo["query"]) == (path, query)


def test_a_post_to_the_service_root_is_forwarded_not_redirected(proxy):
    answer = send_raw(proxy, get("/service/llm", "Content-Length: 2", method="POST", body=b"hi"))
    assert backend_not_found(answer) == "/"


# -- Host header and absolute-form tricks ----------------------------------------------------

@pytest.mark.parametrize("request_template", [
    get("/service/llm/echo", "Host: evil.example:1"),
    get("/service/llm/echo", "Host: {decoy}"),
    get("/service/llm/echo", "Host: {decoy}", "X-Forwarded-Host: {decoy}", "X-Forwarded-For: {decoy}"),
    get("http://127.0.0.2:1/service/llm/echo"),
    get("http://{decoy}/service/llm/echo"),
    get("http://{decoy}/service/llm/echo", "Host: {decoy}"),
    get("https://{decoy}/service/llm/echo"),
], ids=["evil_host", "decoy_host", "decoy_forwarded", "absolute_form_127_0_0_2", "absolute_form_decoy",
        "absolute_form_and_host", "absolute_form_https"])
def test_host_tricks_still_reach_only_the_configured_backend(proxy, llm_backend, decoy, request_template):
    echo = echoed(send_raw(proxy, request_template.replace(b"{decoy}", decoy.encode())), llm_backend)
    assert echo["raw_path"] == "/echo"


def test_an_absolute_form_front_door_request_sends_the_backend_only_its_path(proxy, decoy):
    body = b'{"model": "llm"}'
    answer = send_raw(proxy, get(f"http://{decoy}/v1/no-such-route?x=1", "Content-Type: application/json",
                                 f"Content-Length: {len(body)}", method="POST", body=body))
    assert backend_not_found(answer) == "/v1/no-such-route"  # the backend reports the path alone


# -- bodies ------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"zz\r\nhello\r\n0\r\n\r\n",                 # a chunk size that is not hex
    b"5\r\nhelloXX0\r\n\r\n",                    # a chunk without its CRLF
    b"5;" + b"x" * 100_000 + b"\r\nhello\r\n0\r\n\r\n",  # an endless chunk extension
], ids=["bad_chunk_size", "missing_chunk_terminator", "huge_chunk_extension"])
@pytest.mark.parametrize("keep_alive", [False, True], ids=["close", "keep_alive"])
def test_a_malformed_chunked_body_is_400_not_500(proxy, body, keep_alive):
    request = get("/service/llm/echo", "Transfer-Encoding: chunked", method="POST", body=body)
    if keep_alive:  # and a second request behind it on the same connection
        request = request.replace(b"Connection: close\r\n", b"") + get("/healthz")
    error = proxy_error(send_raw(proxy, request), 400, "invalid_body")
    assert error["service_id"] == "llm"


ADMIN_BODIES = {
    "invalid_json": ("application/json", b"{bad json"),
    "json_nul": ("application/json", b'{"a": "\x00"}'),
    "deep_json": ("application/json", b"[" * 100_000 + b"]" * 100_000),
    "binary": ("application/octet-stream", bytes(range(256)) * 64),
    "form": ("application/x-www-form-urlencoded", b"wait=%zz&timeout=%ff&a=" + b"b" * 50_000),
}


@pytest.mark.parametrize("content_type,body", ADMIN_BODIES.values(), ids=ADMIN_BODIES.keys())
@pytest.mark.parametrize("target,status,code", [
    ("/api/v1/service/nope/start", 404, "service_not_found"),
    ("/api/v1/service/nope/stop", 404, "service_not_found"),
    ("/api/v1/service/llm/start?wait=maybe", 400, "invalid_parameter"),
])
def test_admin_routes_ignore_any_body(proxy, content_type, body, target, status, code):
    # The admin API reads no body: what comes is ignored, and the answer is the usual one.
    request = get(target, f"Content-Type: {content_type}", f"Content-Length: {len(body)}", method="POST",
                  body=body)
    proxy_error(send_raw(proxy, request), status, code)


@pytest.mark.parametrize("query", ["wait=%ff", "wait=", "wait=true%00", "timeout=%zz", "timeout=1e309",
                                   "timeout=nan", "timeout=-inf", "timeout=0", "timeout=3600.0001",
                                   "wait=true&timeout=" + "9" * 1000])
def test_bad_start_parameters_are_400(proxy, query):
    answer = send_raw(proxy, get(f"/api/v1/service/llm/start?{query}", "Content-Length: 0", method="POST"))
    proxy_error(answer, 400, "invalid_parameter")


# -- wrong methods ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,target,allowed", [
    ("GET", "/api/v1/service/llm/start", {"POST"}),
    ("PUT", "/api/v1/service/llm/stop", {"POST"}),
    ("DELETE", "/api/v1/services", {"GET", "HEAD"}),
    ("POST", "/api/v1/container/llm", {"GET", "HEAD"}),
    ("PATCH", "/api/v1/openapi.json", {"GET", "HEAD"}),
    ("POST", "/healthz", {"GET", "HEAD"}),
    ("PROPFIND", "/api/v1/services", {"GET", "HEAD"}),
])
def test_wrong_methods_are_405_in_the_envelope_with_allow(proxy, method, target, allowed):
    answer = send_raw(proxy, get(target, "Content-Length: 0", method=method))
    proxy_error(answer, 405, "method_not_allowed")
    assert {m.strip() for m in answer[1]["Allow"].split(",")} - {"OPTIONS"} == allowed


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND", "BREW"])
def test_methods_the_forwarder_does_not_take_are_405(proxy, method):
    proxy_error(send_raw(proxy, get("/service/llm/echo", method=method)), 405, "method_not_allowed")
