"""What a client can make the proxy log, through real gunicorn: its text never forges log
lines or drives a terminal, and the configured secrets never reach the log, whatever quotes
them.
"""
from __future__ import annotations

import json
import re
import socket

import pytest
import requests

from conftest import service_entry
from proxy.config import load_config_text

LINE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} \| (DEBUG|INFO|WARNING|ERROR|CRITICAL) *\| .*")
FORGED = "2020-01-01 00:00:00.000 | ERROR    | forged"
KEY = "key-0f3c9a77d1"
ADMIN_TOKEN = "adm-5e1b22c8f4"
ENV_SECRET = "env-secret-b6d04e1a"  # ${HF_TOKEN} in the config


@pytest.fixture(scope="module")
def proxy(module_launchers):
    """At DEBUG, with an API key, an admin token and an environment value from ${VAR}s."""
    start_backend, start_proxy = module_launchers
    services = {"llm": service_entry(start_backend().port, environment={"HF_TOKEN": "${HF_TOKEN}"})}
    server = {"api_keys": ["${CLIENT_KEY}"], "admin_token": "${ADMIN_TOKEN}"}
    return start_proxy(services, log_level="DEBUG", server_extra=server,
                       env={"CLIENT_KEY": KEY, "ADMIN_TOKEN": ADMIN_TOKEN, "HF_TOKEN": ENV_SECRET})


def _raw(proxy, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while data := sock.recv(65536):
            received += data
    return received


def _logged_since(proxy, start: int) -> str:
    with open(proxy.log_path, "rb") as log:
        log.seek(start)
        return log.read().decode("utf-8", errors="replace")


# -- client text in log lines ----------------------------------------------------------------------

def test_client_text_never_forges_log_lines_or_reaches_the_terminal_raw(proxy):
    start = proxy.log_path.stat().st_size
    forged = FORGED.replace(" ", "%20").replace("|", "%7C")
    authorized = f"X-Api-Key: {KEY}\r\nConnection: close\r\n"
    hostile = [
        f"GET /service/llm/echo%0a{forged}%1b[31m HTTP/1.1\r\nHost: 127.0.0.1\r\n{authorized}\r\n",  # a path
        f"GET /service/ll%0d%0a{forged}%00%1b[2Jm/x HTTP/1.1\r\nHost: 127.0.0.1\r\n{authorized}\r\n",  # a service id
        f"GET /service/llm/%E2%80%AEtxt.exe HTTP/1.1\r\nHost: 127.0.0.1\r\n{authorized}\r\n",  # right-to-left override
        "GET /\x1b[31m\x00x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # refused by gunicorn, which quotes it
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x1b[31mb\r\n\r\n",
    ]
    for request in hostile:
        assert _raw(proxy, request.encode("latin-1")).startswith(b"HTTP/1.1 ")
    model = f"m\n{FORGED}\x1b[2J\u202e"  # a model name, in the 404 that names it
    answer = requests.post(f"{proxy.url}/v1/chat/completions", json={"model": model},
                           headers={"X-Api-Key": KEY, "Connection": "close"}, timeout=10)
    assert answer.json()["error"]["code"] == "model_not_found"

    logged = _logged_since(proxy, start)
    lines = logged.splitlines()
    assert len(lines) >= 10
    assert [line for line in lines if not LINE.fullmatch(line)] == []
    assert [line for line in lines if re.match(r".{34}2020-01-01", line)] == [], "a client started a log line"
    assert [c for c in logged if not (c.isprintable() or c == "\n")] == []
    assert "\\n2020-01-01" in logged and "\\x1b[31m" in logged  # written escaped, not lost


# -- secrets in whatever quotes them ---------------------------------------------------------------

def test_configured_secrets_never_reach_the_log_even_in_a_malformed_request(proxy):
    start = proxy.log_path.stat().st_size
    for line in [f"X-Api-Key {KEY}", f"Authorization {ADMIN_TOKEN}", f"X-Token {ENV_SECRET}"]:  # no colon
        answer = _raw(proxy, f"GET /service/llm/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n{line}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 400 ")
    authorized = {"X-Api-Key": KEY, "Connection": "close"}
    assert requests.get(f"{proxy.url}/service/{ENV_SECRET}/x", headers=authorized, timeout=10).status_code == 404
    assert requests.post(f"{proxy.url}/v1/chat/completions", json={"model": f"{KEY}{ADMIN_TOKEN}"},
                         headers=authorized, timeout=10).status_code == 404
    logged = _logged_since(proxy, start)
    assert "Invalid HTTP Header: 'X-Api-Key ***'" in logged  # gunicorn's line is there, masked
    for secret in (KEY, ADMIN_TOKEN, ENV_SECRET):
        assert secret not in logged


def test_the_secrets_are_the_keys_the_token_and_what_came_from_the_environment():
    config = load_config_text(
        'server: {api_keys: ["${K}", "literal-key"], admin_token: "${T}", host: "${H:-127.0.0.1}"}\n'
        'services: {a: {type: llama-cpp-server, image: x, port: 9, args: ["--key=${S}", "${N}"]}}\n',
        environ={"K": "key-from-env", "T": "token-from-env", "S": "arg-secret", "N": "1"})
    assert config.secrets == {"key-from-env", "literal-key", "token-from-env", "arg-secret"}
    # Not the default (it is written in the file), nor a value too short to be worth masking.
