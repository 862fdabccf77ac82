"""Docker's detail about a failed start reaches the operator's log, not the client, through
real gunicorn without an engine: service 'vol' starts on demand and cannot, since its
volume's host path does not exist (checked before Docker is asked), and Docker's kind of
message names that path.
"""
from __future__ import annotations

import json
import re
import uuid

import pytest
import requests

from conftest import free_port, service_entry

KEY = "key-0f3c9a77d1"
ADMIN_TOKEN = "adm-5e1b22c8f4"
MISSING = f"/nonexistent-{uuid.uuid4().hex}"  # the host path 'vol' mounts
CLIENT = {"X-Api-Key": KEY, "Connection": "close"}


@pytest.fixture(scope="module")
def proxy(module_launchers):
    _, start_proxy = module_launchers
    services = {"vol": service_entry(free_port(), autostart=True, volumes=[f"{MISSING}:/models:ro"])}
    server = {"api_keys": ["${CLIENT_KEY}"], "admin_token": "${ADMIN_TOKEN}"}
    return start_proxy(services, log_level="INFO", server_extra=server,
                       env={"CLIENT_KEY": KEY, "ADMIN_TOKEN": ADMIN_TOKEN})

def _plain_with_ref(error: dict) -> str:
    assert error["code"] == "volume_missing" and error["service_id"] == "vol" and error["source"] == "proxy"
    assert MISSING not in json.dumps(error) and "hint" not in error
    assert re.fullmatch(r"[0-9a-f]{12}", error["ref"]), error
    assert error["ref"] in error["message"]
    return error["ref"]


CLIENT_ROUTES = {
    "front_door": ("/v1/chat/completions", {"model": "vol", "messages": []}),
    "front_door_streamed": ("/v1/chat/completions", {"model": "vol", "messages": [], "stream": True}),
    "service": ("/service/vol/v1/chat/completions", {"model": "x", "messages": []}),
}


@pytest.mark.parametrize("path, body", CLIENT_ROUTES.values(), ids=CLIENT_ROUTES.keys())
def test_a_failed_start_shows_clients_a_plain_message_and_the_log_a_ref_to_the_detail(proxy, path, body):
    answer = requests.post(f"{proxy.url}{path}", json=body, headers=CLIENT, timeout=30)
    if body.get("stream"):  # the event stream began while the start ran: the error is an event
        assert answer.status_code == 200
        (event,) = [line for line in answer.text.splitlines() if line.startswith("data: ")]
        error = json.loads(event[len("data: "):])["error"]
    else:
        assert answer.status_code == 500, answer.text
        error = answer.json()["error"]
    assert MISSING not in answer.text
    ref = _plain_with_ref(error)
    logged = [line for line in proxy.log().splitlines() if f"(ref {ref})" in line]
    assert len(logged) == 1 and MISSING in logged[0], logged


def test_the_admin_api_shows_the_full_detail_of_a_failed_start(proxy):
    answer = requests.post(f"{proxy.url}/api/v1/service/vol/start",
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Connection": "close"}, timeout=30)
    assert answer.status_code == 500, answer.text
    error = answer.json()["error"]
    assert error["code"] == "volume_missing" and MISSING in error["message"] and "ref" not in error
    assert error["hint"] == "Create it, or fix services.vol.volumes"
