"""The Host and Origin checks and the CORS answers, request by request, through real gunicorn
with backend processes behind service 'llm' (no Docker engine: the proxy forwards without
knowing container states). What a real browser makes of them: tests/test_cross_site.py.
"""
from __future__ import annotations

import pytest
import requests

from conftest import service_entry
from proxy.config import ConfigError, load_config_text

APP = "http://app.example:3000"  # the allowed origin of the guarded proxy
KEY = "origin-test-key-41"
TOKEN = "origin-test-token-52"
CLOSE = {"Connection": "close"}
CHAT = {"model": "llm", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def proxies(module_launchers):
    """{"open": defaults, "guarded": allowed_hosts, cors_origins, keys and token,
    "star": any host and origin}, each with a backend of its own: (proxy, backend)."""
    start_backend, start_proxy = module_launchers
    servers = {
        "open": {},
        "guarded": {"allowed_hosts": ["proxy.example"], "cors_origins": [APP], "api_keys": [KEY],
                    "admin_token": TOKEN},
        "star": {"allowed_hosts": ["*"], "cors_origins": ["*"]},
    }
    made = {}
    for name, server in servers.items():
        backend = start_backend()
        made[name] = (start_proxy({"llm": service_entry(backend.port)}, server_extra=server, log_level="INFO"),
                      backend)
    return made


def _error(answer, status: int, code: str) -> dict:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == code and error["source"] == "proxy", error
    return error


def _untouched(backend, before: int) -> None:
    assert backend.stats()["requests"] == before + 1, "the request reached the backend"  # +1: this call


# -- Host ------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["localhost", "localhost:1", "LocalHost.", "127.0.0.1", "127.0.0.1:9",
                                  "127.45.6.7", "[::1]", "[::1]:80", "[::ffff:127.0.0.1]"])
def test_this_machines_names_are_answered(proxies, host):
    proxy, _ = proxies["open"]
    answer = requests.get(f"{proxy.url}/healthz", headers={"Host": host, **CLOSE}, timeout=10)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("host", ["proxy.example", "PROXY.example:8443", "127.0.0.1", "localhost"])
def test_configured_hosts_are_answered_besides_this_machines_names(proxies, host):
    proxy, _ = proxies["guarded"]
    answer = requests.get(f"{proxy.url}/healthz", headers={"Host": host, **CLOSE}, timeout=10)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("method, path", [("GET", "/healthz"), ("GET", "/api/v1/services"),
                                          ("POST", "/api/v1/service/llm/start"), ("GET", "/v1/models"),
                                          ("POST", "/v1/chat/completions"), ("GET", "/service/llm/echo"),
                                          ("POST", "/service/llm/echo"), ("GET", "/no/such/page")])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:11000", "127.0.0.1.evil.example", "10.0.0.1",
                                  "[::2]", "proxy.example"])
def test_a_host_not_allowed_is_400_and_reaches_nothing(proxies, host, method, path):
    """A page on a name rebound to 127.0.0.1 sends that name: every answer is this refusal."""
    proxy, backend = proxies["open"]
    before = backend.stats()["requests"]
    answer = requests.request(method, f"{proxy.url}{path}", json=CHAT, headers={"Host": host, **CLOSE}, timeout=10)
    error = _error(answer, 400, "host_not_allowed")
    assert "server.allowed_hosts" in error["hint"]
    _untouched(backend, before)


def test_a_star_answers_any_host(proxies):
    proxy, _ = proxies["star"]
    answer = requests.get(f"{proxy.url}/service/llm/echo", headers={"Host": "anything.example", **CLOSE}, timeout=10)
    assert answer.status_code == 200, answer.text


# -- Origin ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "GET"])
@pytest.mark.parametrize("path", ["/api/v1/service/llm/start", "/v1/chat/completions", "/service/llm/echo",
                                  "/healthz"])
@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1", "http://localhost"])
def test_a_page_of_a_foreign_origin_is_403_and_reaches_nothing(proxies, origin, path, method):
    proxy, backend = proxies["open"]
    before = backend.stats()["requests"]
    answer = requests.request(method, f"{proxy.url}{path}", json=CHAT, headers={"Origin": origin, **CLOSE},
                              timeout=10)
    error = _error(answer, 403, "origin_not_allowed")
    assert "server.cors_origins" in error["hint"]
    assert "Access-Control-Allow-Origin" not in answer.headers
    _untouched(backend, before)


def test_a_page_of_the_proxy_itself_is_not_foreign(proxies):
    proxy, _ = proxies["open"]
    answer = requests.post(f"{proxy.url}/service/llm/echo", data=b"x", headers={"Origin": proxy.url, **CLOSE},
                           timeout=10)
    assert answer.status_code == 200 and answer.json()["method"] == "POST", answer.text
    assert "Access-Control-Allow-Origin" not in answer.headers  # same origin: none needed


@pytest.mark.parametrize("method, site, mode, dest", [
    ("GET", "cross-site", "no-cors", "image"), ("GET", "same-site", "no-cors", "script"),
    ("GET", "same-site", "navigate", "iframe"), ("POST", "cross-site", "navigate", "document"),
    ("GET", "cross-site", "cors", "empty"),
])
def test_what_another_sites_page_embeds_without_an_origin_is_403(proxies, method, site, mode, dest):
    proxy, backend = proxies["open"]
    before = backend.stats()["requests"]
    answer = requests.request(method, f"{proxy.url}/service/llm/echo", timeout=10, headers={
        "Sec-Fetch-Site": site, "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": dest, **CLOSE})
    _error(answer, 403, "origin_not_allowed")
    _untouched(backend, before)


@pytest.mark.parametrize("site, mode, dest", [("cross-site", "navigate", "document"), ("none", "navigate", "document"),
                                              ("same-origin", "no-cors", "image"), ("same-origin", "cors", "empty")])
def test_links_typed_urls_and_the_proxys_own_pages_are_answered(proxies, site, mode, dest):
    proxy, _ = proxies["open"]
    answer = requests.get(f"{proxy.url}/service/llm/echo", timeout=10, headers={
        "Sec-Fetch-Site": site, "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": dest, **CLOSE})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("path", ["/api/v1/service/llm/start", "/v1/chat/completions",
                                  "/service/llm/v1/chat/completions", "/healthz"])
def test_a_preflight_from_an_allowed_origin_is_204_without_credentials(proxies, path):
    proxy, backend = proxies["guarded"]
    before = backend.stats()["requests"]
    answer = requests.options(f"{proxy.url}{path}", timeout=10, headers={
        "Origin": APP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang", **CLOSE})
    assert answer.status_code == 204, answer.text
    assert answer.headers["Access-Control-Allow-Origin"] == APP
    assert {"POST", "PUT", "PATCH", "DELETE", "GET"} <= {m.strip() for m in
                                                         answer.headers["Access-Control-Allow-Methods"].split(",")}
    allowed_headers = {h.strip().lower() for h in answer.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-api-key", "x-stainless-lang"} <= allowed_headers
    assert "Origin" in answer.headers["Vary"]
    _untouched(backend, before)  # answered by the proxy, also under /service/<id>/


def test_a_preflight_from_a_foreign_origin_is_403(proxies):
    proxy, backend = proxies["guarded"]
    before = backend.stats()["requests"]
    answer = requests.options(f"{proxy.url}/service/llm/echo", timeout=10, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST", **CLOSE})
    _error(answer, 403, "origin_not_allowed")
    _untouched(backend, before)


@pytest.mark.parametrize("name, headers", [("open", {}), ("guarded", {"Origin": APP, "X-Api-Key": KEY})])
def test_an_options_request_that_is_no_preflight_is_forwarded(proxies, name, headers):
    proxy, _ = proxies[name]
    answer = requests.options(f"{proxy.url}/service/llm/echo", headers={**headers, **CLOSE}, timeout=10)
    assert answer.status_code == 200 and answer.json()["method"] == "OPTIONS", answer.text


@pytest.mark.parametrize("path, headers, status", [
    ("/service/llm/echo", {"X-Api-Key": KEY}, 200),
    ("/service/llm/echo", {}, 401),  # the refusal too, so the page can read why
    ("/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}, 200),
    ("/api/v1/service/nope/start", {"Authorization": f"Bearer {TOKEN}"}, 404),
])
def test_answers_to_an_allowed_origin_carry_it(proxies, path, headers, status):
    proxy, _ = proxies["guarded"]
    method = "GET" if path.endswith("echo") else "POST"
    answer = requests.request(method, f"{proxy.url}{path}", json=CHAT, timeout=10,
                              headers={"Origin": APP, **headers, **CLOSE})
    assert answer.status_code == status, answer.text
    assert answer.headers["Access-Control-Allow-Origin"] == APP
    assert "Origin" in answer.headers["Vary"]
    without = requests.request(method, f"{proxy.url}{path}", json=CHAT, timeout=10, headers={**headers, **CLOSE})
    assert "Access-Control-Allow-Origin" not in without.headers


def test_a_star_allows_any_origin_by_name(proxies):
    proxy, _ = proxies["star"]
    answer = requests.post(f"{proxy.url}/v1/chat/completions", json=CHAT, timeout=10,
                           headers={"Origin": "http://any.example", **CLOSE})
    assert answer.status_code == 200, answer.text
    assert answer.headers["Access-Control-Allow-Origin"] == "http://any.example"  # never "*"


# -- the front door takes JSON only ----------------------------------------------------------

@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx", "text/json"])
def test_a_front_door_post_that_does_not_say_json_is_415(proxies, content_type):
    """A form or a no-cors fetch can send only such types: JSON in them is not a request."""
    proxy, backend = proxies["open"]
    before = backend.stats()["requests"]
    headers = {**CLOSE, **({"Content-Type": content_type} if content_type else {})}
    answer = requests.post(f"{proxy.url}/v1/chat/completions", data=b'{"model": "llm"}', headers=headers,
                           timeout=10)
    error = _error(answer, 415, "unsupported_media_type")
    assert error["type"] == "invalid_request_error" and "application/json" in error["hint"]
    _untouched(backend, before)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_or_in_any_case_is_taken(proxies, content_type):
    proxy, _ = proxies["open"]
    answer = requests.post(f"{proxy.url}/v1/chat/completions", data=b'{"model": "llm", "max_tokens": 2}',
                           headers={"Content-Type": content_type, **CLOSE}, timeout=10)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "tok0 tok1 ", answer.text


# -- the settings ------------------------------------------------------------------------------

def test_hosts_and_origins_are_kept_the_way_requests_name_them():
    server = load_config_text("server:\n  allowed_hosts: [Proxy.LAN., '[0:0::1]', '*', 10.0.0.2]\n"
                              "  cors_origins: ['HTTP://App.example:80/', 'https://a.example:443', "
                              "'http://localhost:3000', '*']\n").server
    assert server.allowed_hosts == ("proxy.lan", "::1", "*", "10.0.0.2")
    assert server.cors_origins == ("http://app.example", "https://a.example", "http://localhost:3000", "*")
    assert load_config_text("").server.allowed_hosts == () == load_config_text("").server.cors_origins


@pytest.mark.parametrize("key, value", [
    ("allowed_hosts", "proxy.lan:8080"), ("allowed_hosts", "a b"), ("allowed_hosts", ""),
    ("allowed_hosts", "http://proxy.lan"), ("allowed_hosts", "[nope]"),
    ("cors_origins", "localhost:3000"), ("cors_origins", "http://app.example/path"), ("cors_origins", "ftp://x"),
    ("cors_origins", "http://x:99999"), ("cors_origins", "null"), ("cors_origins", "http://x:\uff11"),
])
def test_a_malformed_host_or_origin_is_a_config_error_naming_it(key, value):
    good = {"allowed_hosts": "ok.example", "cors_origins": "http://ok.example"}[key]
    with pytest.raises(ConfigError) as raised:
        load_config_text(f"server:\n  {key}: [{good!r}, {value!r}]\n")
    assert len(raised.value.errors) == 1 and raised.value.errors[0].startswith(f"config.yaml: server.{key}.1: Must be")
