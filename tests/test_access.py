"""Access control and body limits, end to end through real gunicorn: the admin token, the
proxy's API keys (and that they never reach a backend or the log), and ``max_body_size``.

One proxy is shared by the module: admin token and two API keys from the environment, and
three backend processes (with a body limit, without one, and one kept for the chunked
upload that is cut off). The proxy sees no Docker engine, so it forwards without knowing
container states.
"""
from __future__ import annotations

import hashlib
import http.client
import socket

import pytest
import requests
from flask import Flask

from conftest import recv_until, service_entry, wait_until
from proxy.routes.auth import register_auth
from proxy.config import ServerConfig

ADMIN_TOKEN = "adm-7Qx9-token"
KEYS = ["key-one-5f2a", "key-two-9c3d"]
WRONG = "not-the-key-1234"
BACKEND_OWN = "backend-own-key-77"
SECRETS = [ADMIN_TOKEN, *KEYS, WRONG]
LIMIT = 64 * 1024
CHALLENGE = 'Bearer realm="inference-proxy"'


@pytest.fixture(scope="module")
def guarded(module_launchers):
    """(proxy, {"llm": backend, "open": backend, "chunky": backend})."""
    start_backend, proxies = module_launchers
    backends = {name: start_backend() for name in ("llm", "open", "chunky")}
    services = {
        "llm": service_entry(backends["llm"].port, max_body_size="64k"),
        "open": service_entry(backends["open"].port),
        "chunky": service_entry(backends["chunky"].port, max_body_size=str(LIMIT)),  # for one test only
    }
    server = {"admin_token": "${PROXY_ADMIN_TOKEN}", "api_keys": ["${KEY_ONE}", "${KEY_TWO}"]}
    env = {"PROXY_ADMIN_TOKEN": ADMIN_TOKEN, "KEY_ONE": KEYS[0], "KEY_TWO": KEYS[1]}
    proxy = proxies(services, server_extra=server, env=env)
    return proxy, backends


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _unauthorized(answer, service_id=None) -> dict:
    assert answer.status_code == 401, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.headers["WWW-Authenticate"].startswith(CHALLENGE)
    error = answer.json()["error"]
    assert error["code"] == "unauthorized" and error["type"] == "authentication_error"
    assert error["source"] == "proxy" and error["service_id"] == service_id
    assert not any(secret in answer.text for secret in SECRETS)
    return error


def _echoed_headers(answer) -> dict:
    assert answer.status_code == 200, answer.text
    return {name.lower(): value for name, value in answer.json()["headers"]}


# -- the admin API ----------------------------------------------------------------------------

ADMIN_CALLS = [("GET", "/api/v1/services"), ("GET", "/api/v1/container/llm"),
               ("POST", "/api/v1/service/llm/start"), ("POST", "/api/v1/service/llm/stop"),
               ("POST", "/api/v1/service/nope/start")]


@pytest.mark.parametrize("method, path", ADMIN_CALLS)
def test_admin_api_without_a_token_is_401(guarded, method, path):
    proxy, _ = guarded
    answer = requests.request(method, f"{proxy.url}{path}", timeout=10)
    _unauthorized(answer)
    assert answer.headers["WWW-Authenticate"] == CHALLENGE  # no token: no error attribute


@pytest.mark.parametrize("headers", [
    _bearer(WRONG), _bearer(KEYS[0]), _bearer(ADMIN_TOKEN + "x"), _bearer(ADMIN_TOKEN[:-1]),
    {"Authorization": f"Basic {ADMIN_TOKEN}"}, {"Authorization": ADMIN_TOKEN},
    {"X-Api-Key": ADMIN_TOKEN}, {"Authorization": "Bearer "},
], ids=["wrong", "api-key", "longer", "shorter", "basic", "no-scheme", "x-api-key", "empty"])
def test_admin_api_with_a_wrong_token_is_401(guarded, headers):
    proxy, _ = guarded
    _unauthorized(requests.post(f"{proxy.url}/api/v1/service/llm/start", headers=headers, timeout=10))


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_admin_api_with_the_token_gets_through(guarded, scheme):
    proxy, _ = guarded
    headers = {"Authorization": f"{scheme} {ADMIN_TOKEN}"}
    # Past the check, the admin API answers as usual: an unknown service, and no engine here.
    answer = requests.post(f"{proxy.url}/api/v1/service/nope/start", headers=headers, timeout=10)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "service_not_found"
    # This proxy has no engine (DOCKER_HOST=NO_ENGINE): the status is the last known, marked so.
    wait_until(lambda: requests.get(f"{proxy.url}/api/v1/services", headers=headers, timeout=30).json()
               ["services"][0]["engine"] == "unreachable", timeout=5, what="the engine to be marked unreachable")


def test_healthz_stays_open(guarded):
    proxy, _ = guarded
    answer = requests.get(f"{proxy.url}/healthz", timeout=10)
    assert answer.status_code == 200 and answer.json()["status"] == "ok"


# -- the proxy routes -------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {}, _bearer(WRONG), _bearer(ADMIN_TOKEN), {"X-Api-Key": WRONG}, {"X-Api-Key": ""},
    {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": KEYS[0]}, _bearer(KEYS[0] + KEYS[1]),
], ids=["none", "wrong", "admin-token", "wrong-x-api-key", "empty-x-api-key", "basic", "no-scheme", "joined"])
def test_proxy_route_without_a_valid_key_is_401(guarded, headers):
    proxy, backends = guarded
    before = backends["llm"].stats()["requests"]
    _unauthorized(requests.get(f"{proxy.url}/service/llm/echo", headers=headers, timeout=10), service_id="llm")
    assert backends["llm"].stats()["requests"] == before + 1  # just the /_stats call: never forwarded


def test_the_challenge_says_invalid_token_when_one_was_sent(guarded):
    proxy, _ = guarded
    answer = requests.get(f"{proxy.url}/service/llm/echo", headers=_bearer(WRONG), timeout=10)
    assert answer.headers["WWW-Authenticate"] == f'{CHALLENGE}, error="invalid_token"'
    assert _unauthorized(answer, "llm")["message"] == "Invalid API key"


def test_an_unknown_service_is_401_too_before_anything_is_revealed(guarded):
    proxy, _ = guarded
    _unauthorized(requests.get(f"{proxy.url}/service/nope/v1/models", timeout=10), service_id="nope")


@pytest.mark.parametrize("key", KEYS)
def test_each_api_key_as_bearer_is_accepted_and_not_forwarded(guarded, key):
    proxy, _ = guarded
    headers = _echoed_headers(requests.get(f"{proxy.url}/service/llm/echo", headers=_bearer(key), timeout=10))
    assert "authorization" not in headers and "x-api-key" not in headers
    assert key not in str(headers)


@pytest.mark.parametrize("key", KEYS)
def test_x_api_key_is_accepted_and_not_forwarded(guarded, key):
    proxy, _ = guarded
    headers = _echoed_headers(requests.get(f"{proxy.url}/service/llm/echo", headers={"X-Api-Key": key}, timeout=10))
    assert "x-api-key" not in headers and "authorization" not in headers


def test_backend_own_authorization_is_kept_when_the_proxy_key_came_in_x_api_key(guarded):
    proxy, _ = guarded
    answer = requests.get(f"{proxy.url}/service/llm/echo", timeout=10,
                          headers={"X-Api-Key": KEYS[1], **_bearer(BACKEND_OWN)})
    headers = _echoed_headers(answer)
    assert headers["authorization"] == f"Bearer {BACKEND_OWN}"
    assert "x-api-key" not in headers


def test_proxy_key_in_both_headers_is_forwarded_in_neither(guarded):
    proxy, _ = guarded
    answer = requests.get(f"{proxy.url}/service/llm/echo", timeout=10,
                          headers={"X-Api-Key": KEYS[0], **_bearer(KEYS[1])})
    headers = _echoed_headers(answer)
    assert "authorization" not in headers and "x-api-key" not in headers


def test_streaming_works_with_a_key(guarded):
    proxy, _ = guarded
    with requests.get(f"{proxy.url}/service/open/stream", params={"events": 3}, headers=_bearer(KEYS[0]),
                      stream=True, timeout=10) as answer:
        assert answer.status_code == 200
        assert answer.content.count(b"data: ") >= 3


def test_without_api_keys_both_headers_pass_through(backend, start_proxy):
    proxy = start_proxy({"llm": service_entry(backend.port)})
    answer = requests.get(f"{proxy.url}/service/llm/echo", timeout=10,
                          headers={"X-Api-Key": "client-key", **_bearer(BACKEND_OWN)})
    headers = _echoed_headers(answer)
    assert headers["authorization"] == f"Bearer {BACKEND_OWN}" and headers["x-api-key"] == "client-key"
    answer = requests.post(f"{proxy.url}/api/v1/service/nope/start", timeout=10)  # open: no 401
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "service_not_found"


def test_nothing_is_registered_when_nothing_is_configured():
    app = Flask(__name__)
    register_auth(app, ServerConfig())
    assert not any(app.before_request_funcs.values())
    register_auth(app, ServerConfig(admin_token=ADMIN_TOKEN))
    assert list(app.before_request_funcs) == ["admin", "metrics"]  # the forward path pays nothing


# -- max_body_size ------------------------------------------------------------------------------

def _upload(proxy, service_id: str, data, **kwargs):
    return requests.post(f"{proxy.url}/service/{service_id}/upload", data=data, timeout=30,
                         headers=_bearer(KEYS[0]), **kwargs)


def _too_large(answer, service_id: str) -> dict:
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["code"] == "body_too_large" and error["source"] == "proxy" and error["service_id"] == service_id
    assert str(LIMIT) in error["message"]
    return error


def test_a_body_at_the_limit_passes(guarded):
    proxy, _ = guarded
    body = b"x" * LIMIT
    assert _upload(proxy, "llm", body).json() == {"bytes": LIMIT, "sha256": hashlib.sha256(body).hexdigest()}


def test_a_length_over_the_limit_is_413_and_never_reaches_the_backend(guarded):
    proxy, backends = guarded
    before = backends["llm"].stats()
    _too_large(_upload(proxy, "llm", b"x" * (LIMIT + 1)), "llm")
    after = backends["llm"].stats()
    assert after["requests"] == before["requests"] + 1  # the /_stats call itself
    assert after["connections_accepted"] == before["connections_accepted"] + 1


def test_a_huge_announced_length_is_refused_before_the_body_is_sent(guarded):
    """The answer comes from the headers alone: nothing is read or buffered first."""
    proxy, _ = guarded
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"POST /service/llm/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS[0]}\r\n"
                     f"Content-Length: {50 * 1024 ** 3}\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 413
        assert response.getheader("Content-Type").startswith("application/json")


def test_a_chunked_body_at_the_limit_passes(guarded):
    proxy, _ = guarded
    parts = [b"a" * 1000, b"b" * (LIMIT - 1001), b"c"]
    whole = b"".join(parts)
    assert _upload(proxy, "llm", iter(parts)).json() == {"bytes": LIMIT, "sha256": hashlib.sha256(whole).hexdigest()}


def test_a_chunked_body_over_the_limit_is_cut_and_413(guarded):
    """The limit is found while the body streams up: the upstream connection is dropped
    mid-body and the client, whose answer has not started yet, gets the 413."""
    proxy, backends = guarded
    chunky = backends["chunky"]
    wait_until(lambda: chunky.stats()["connections_open"] == 1, what="no idle upstream connection")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"POST /service/chunky/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS[1]}\r\n"
                     f"Transfer-Encoding: chunked\r\n\r\n".encode())
        # The client keeps sending (no final chunk): the proxy reads the upload in blocks of
        # 64 KiB, so it sees the limit passed within one block of it.
        piece = b"z" * 16384
        for _ in range((2 * LIMIT + 64 * 1024) // len(piece)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        head = recv_until(sock, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ")
    # The backend saw its request end early; no upstream connection is left hanging.
    wait_until(lambda: chunky.stats()["connections_open"] == 1, timeout=5, what="the upstream connection to close")
    assert "413 body_too_large chunky" in proxy.log()


def test_a_service_without_a_limit_takes_any_size(guarded):
    proxy, _ = guarded
    assert _upload(proxy, "open", b"x" * (4 * LIMIT)).json()["bytes"] == 4 * LIMIT


# -- the log ------------------------------------------------------------------------------------

def test_tokens_and_keys_never_reach_the_log(guarded):
    proxy, _ = guarded
    for headers in (_bearer(ADMIN_TOKEN), _bearer(WRONG), {"X-Api-Key": KEYS[0]}, {"X-Api-Key": WRONG},
                    {"Authorization": f"Bearer {KEYS[1]}", "X-Api-Key": KEYS[0]},
                    {"Authorization": WRONG}, {"Authorization": f"Basic {KEYS[1]}"}):
        for method, path in (("GET", "/service/llm/echo"), ("GET", "/service/nope/x"),
                             ("POST", "/service/llm/upload"), ("GET", "/api/v1/services"),
                             ("POST", "/api/v1/service/nope/start")):
            requests.request(method, f"{proxy.url}{path}", headers=headers, timeout=30,
                             data=b"x" * (LIMIT + 1) if path.endswith("upload") else None)
    log = proxy.log()
    assert "| DEBUG    |" in log and "401 unauthorized" in log and "413 body_too_large" in log
    for secret in SECRETS:
        assert secret not in log
