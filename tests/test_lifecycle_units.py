"""The on-demand lifecycle on its own, where the engine cannot be made to misbehave."""
from __future__ import annotations

import docker.errors
import pytest

from proxy.config import load_config_text
from proxy.shared.coordinator import Coordinator
from proxy.errors import ProxyError
from proxy.services.lifecycle import Lifecycle
from proxy.forwarding.upstream import UpstreamPool

CONFIG = """
services:
  llm:
    type: llama-cpp-server
    image: example/llama:latest
    port: 8081
    autostart: true
"""


class _EngineAnswers500:
    """A real engine cannot be told to fail an API call with a 500 on demand; this can."""

    def start(self, service):
        raise docker.errors.APIError("500 Server Error: engine hiccup")


def test_an_unexpected_engine_error_in_an_on_demand_start_answers_the_waiters():
    config = load_config_text(CONFIG)
    service = config.services["llm"]
    pool = UpstreamPool()
    lifecycle = Lifecycle(config, _EngineAnswers500(), None, Coordinator(["llm"], [], max_workers=4), pool)
    try:
        start = lifecycle._start_in_background(service)
        with pytest.raises(ProxyError) as caught:
            start.get(timeout=5)  # before: the start greenlet died and every waiter hit its deadline
        assert (caught.value.status, caught.value.code) == (500, "start_failed")
        assert "engine hiccup" in caught.value.message
        again = lifecycle._start_in_background(service)
        assert again is not start  # the next request tries again instead of joining a dead start
        with pytest.raises(ProxyError):
            again.get(timeout=5)
    finally:
        pool.close()
