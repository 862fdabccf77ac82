"""The upstream pool on its own: how it reaches a backend (no proxy process in between)."""
from __future__ import annotations

import socket

import pytest
import requests

from conftest import free_port
from proxy.forwarding.upstream import UpstreamPool


@pytest.fixture
def pool():
    pool = UpstreamPool()
    yield pool
    pool.close()


def _get(pool: UpstreamPool, host: str, port: int) -> requests.Response:
    response = pool.send("GET", f"http://{host}:{port}/health", {"Host": f"{host}:{port}"}, None, (2, 5))
    response.raw.read()
    response.close()
    return response


def test_a_literal_address_is_connected_to_without_a_name_lookup(backend, pool, monkeypatch):
    # Under gevent every lookup is a hop through a thread pool, which a burst of new
    # streams queued behind; backends are always 127.0.0.1:<port>.
    def lookup(*args, **kwargs):
        raise AssertionError(f"getaddrinfo{args} was called for a literal address")
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    assert _get(pool, "127.0.0.1", backend.port).status_code == 200


def test_a_host_name_is_still_looked_up(backend, pool, monkeypatch):
    looked_up = []
    real = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        looked_up.append(host)
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    assert _get(pool, "localhost", backend.port).status_code == 200
    assert looked_up == ["localhost"]


def test_a_refused_literal_address_is_a_connection_error(pool):
    # relay.py turns requests' ConnectionError into 502 upstream_unreachable
    with pytest.raises(requests.ConnectionError, match="Failed to establish a new connection"):
        _get(pool, "127.0.0.1", free_port())
