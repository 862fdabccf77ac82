"""Small helpers for tests that drive the admin API of a proxy on the real engine."""
from __future__ import annotations

import requests


def api(proxy, method: str, path: str, **kwargs) -> requests.Response:
    return requests.request(method, f"{proxy.url}/api/v1{path}", timeout=kwargs.pop("timeout", 60), **kwargs)


def status(proxy, service_id: str = "llm") -> dict:
    answer = api(proxy, "GET", f"/container/{service_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def start_ready(proxy, service_id: str = "llm") -> dict:
    answer = api(proxy, "POST", f"/service/{service_id}/start", params={"wait": "true", "timeout": 60})
    assert answer.status_code == 200, answer.text
    return answer.json()


def containers_of(client, prefix: str) -> list:
    return client.containers.list(all=True, filters={"label": f"io.inference-proxy.instance={prefix}"})


def error_of(answer: requests.Response, status_code: int, code: str, service_id: str | None = None) -> dict:
    """The proxy's error envelope, checked for status, code and (when given) service id."""
    assert answer.status_code == status_code, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["source"] == "proxy", error
    if service_id is not None:
        assert error["service_id"] == service_id, error
    return error
