"""The admin API's OpenAPI document, and the real API held to it.

schemathesis generates requests (valid ones and invalid ones) from the document that
``GET /api/v1/openapi.json`` serves and sends them to a proxy under real gunicorn on the
real Docker engine, whose service runs the test image: no answer may be a 5xx other than
the documented Docker failures, break the document (status, content type, body schema,
error code, Allow on a 405), or leave a traceback in the proxy's log. Every container it
starts is removed afterwards.
"""
from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate as validate_openapi
from schemathesis.specs.openapi.checks import (allow_header_conformance, content_type_conformance,
                                               negative_data_rejection, positive_data_acceptance,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance, unsupported_method)

from conftest import free_port, service_entry
from proxy.routes.openapi import document

# The 5xx answers a healthy proxy may give: Docker refusing, a container dying or being
# slow to start, the engine going away. Anything else (internal_server_error: an
# unhandled exception) is a bug.
DOCKER_FAILURES = frozenset({"start_failed", "image_unavailable", "volume_missing", "container_exited",
                             "start_timeout", "stop_failed", "docker_unavailable"})
ADMIN_ROUTES = {"/healthz": {"get"}, "/api/v1/openapi.json": {"get"}, "/api/v1/services": {"get"},
                "/api/v1/container/{service_id}": {"get"}, "/api/v1/service/{service_id}/start": {"post"},
                "/api/v1/service/{service_id}/stop": {"post"}, "/api/v1/reload": {"post"},
                "/api/v1/events": {"get"}, "/api/v1/service/{service_id}/logs": {"get"}}
# Answers that may not end while the client reads (the feed; logs with follow=true): held to the
# document by the walk below and tests of their own, not by the random run, which reads every
# answer to its end.
ENDLESS = ["/api/v1/events", "/api/v1/service/{service_id}/logs"]
REQUEST_TIMEOUT = 30  # seconds for one call; a start with wait=true on the test image takes about 1


def only_documented_server_errors(ctx, response, case) -> None:
    """A 5xx is fine only as a documented Docker failure, in the proxy's envelope."""
    if response.status_code < 500:
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{response.status_code} without the proxy's error envelope: "
                             f"{response.content[:300]!r}") from None
    assert error.get("source") == "proxy" and error.get("code") in DOCKER_FAILURES, \
        f"undocumented server error {response.status_code}: {error}"


# Every built-in check that applies to an API without auth or resource links, less
# not_a_server_error, which the check above replaces.
CHECKS = [only_documented_server_errors, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance, negative_data_rejection,
          positive_data_acceptance, unsupported_method, allow_header_conformance]


# -- the document itself --------------------------------------------------------------------

@pytest.mark.parametrize("ids,admin_token", [([], False), (["llm", "other"], False), (["llm"], True)])
def test_the_document_is_valid_openapi_3_and_covers_every_admin_route(ids, admin_token):
    spec = document(ids, admin_token=admin_token)
    validate_openapi(spec)
    assert spec["openapi"].startswith("3.")
    assert {path: set(item) for path, item in spec["paths"].items()} == ADMIN_ROUTES
    for path, item in spec["paths"].items():
        for operation in item.values():
            guarded = admin_token and path.startswith("/api/")
            assert ("401" in operation["responses"]) == guarded, (path, operation["responses"].keys())
            assert ("security" in operation) == guarded


@pytest.fixture
def make_app():
    """Factory: the app in-process for a config text, with a Docker client it never gets
    to use (nothing these tests ask needs the engine)."""
    from proxy import create_app
    from proxy.config import load_config_text

    apps = []

    def make(server: str = ""):
        service = f"{{type: llama-cpp-server, image: x, port: {free_port()}}}"
        config = load_config_text(f"{server}services:\n  llm: {service}\n")
        apps.append(create_app(config, docker_client=object()))
        return apps[-1]

    yield make
    for app in apps:
        app.extensions["proxy"].close()


def test_every_admin_route_of_the_app_is_documented(make_app):
    served = {}
    for rule in make_app().url_map.iter_rules():
        if rule.rule.startswith("/api/") or rule.rule == "/healthz":
            served[rule.rule.replace("<service_id>", "{service_id}")] = \
                {method.lower() for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == ADMIN_ROUTES


def test_with_an_admin_token_the_document_says_so_and_needs_it(make_app):
    client = make_app("server: {admin_token: s3cret-token}\n").test_client()
    refused = client.get("/api/v1/openapi.json")
    assert refused.status_code == 401 and refused.json["error"]["code"] == "unauthorized"
    answer = client.get("/api/v1/openapi.json", headers={"Authorization": "Bearer s3cret-token"})
    assert answer.status_code == 200 and answer.json == document(["llm"], admin_token=True)


def test_the_served_document_names_the_configured_services(start_proxy):
    proxy = start_proxy({"llm": service_entry(free_port()), "other": service_entry(free_port())})
    answer = requests.get(f"{proxy.url}/api/v1/openapi.json", timeout=10)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
    spec = answer.json()
    assert spec == document(["llm", "other"])
    (parameter,) = spec["paths"]["/api/v1/container/{service_id}"]["get"]["parameters"]
    assert parameter["example"] == "llm" and "llm, other" in parameter["description"]


# -- the real API against it ----------------------------------------------------------------

def test_every_form_of_gpus_and_the_other_config_fields_keep_to_the_document(start_proxy):
    """What the status page shows of each service's config (no engine needed to report it)."""
    forms = {"all": "all", "two": 2, "some": ["0", "2"], "none": None}
    services = {name: service_entry(free_port(), **({"resources": {"gpus": gpus}} if gpus else {}))
                for name, gpus in forms.items()}
    services["two"].update(autostart=True, idle_timeout="90s", group="shared")
    proxy = start_proxy(services, groups={"shared": {}})
    response = schema["/api/v1/services"]["GET"].Case().call_and_validate(base_url=proxy.url, checks=CHECKS)
    listed = {s["service_id"]: s for s in response.json()["services"]}
    assert {name: s["gpus"] for name, s in listed.items()} == forms
    two = listed["two"]
    assert (two["autostart"], two["idle_timeout"], two["idle_seconds_left"]) == (True, 90, None)
    assert (two["group"], two["exclusive"], two["aliases"]) == ("shared", False, [])
    assert listed["all"]["group"] is None and listed["all"]["idle_timeout"] is None


@pytest.fixture(scope="module")
def api_proxy(module_launchers, docker_client):
    """A proxy on the real engine whose services run the test image: 'llm', and 'slow',
    which loads for a minute. Shared by every operation's test, so one operation meets the
    containers another started. Every container under its prefix is removed afterwards."""
    _, start_proxy = module_launchers
    prefix = f"iptest-{uuid.uuid4().hex[:8]}"
    slow = service_entry(free_port(), args=["--host", "0.0.0.0", "--port", "8080", "--load-seconds", "60"])
    # llm also has what the status page shows: aliases, an exclusive group, an idle stop due.
    llm = service_entry(free_port(), aliases=["llm:8b", "org/Llm-8B"], group="gpu0", idle_timeout=600)
    try:
        proxy = start_proxy({"llm": llm, "slow": slow}, docker_host=None, prefix=prefix,
                            groups={"gpu0": {"exclusive": True}})
        served = requests.get(f"{proxy.url}/api/v1/openapi.json", timeout=10).json()
        assert served == schema.raw_schema, "schemathesis must test the document this proxy serves"
        yield proxy
    finally:
        for container in docker_client.containers.list(
                all=True, filters={"label": f"io.inference-proxy.instance={prefix}"}):
            container.remove(force=True)


# The document that api_proxy serves (it checks that it does), loaded at import so that
# schemathesis makes one test per operation. Its lazy loader, from_fixture(), fails under
# pytest 9.2 (it sets Function._nodeid, which pytest 9.2 no longer has), so the proxy's URL
# is given per call instead.
schema = schemathesis.openapi.from_dict(document(["llm", "slow"]), config=schemathesis.Config.from_dict({
    "request-timeout": REQUEST_TIMEOUT,
    "generation": {"mode": "all"},
    "phases": {"stateful": {"enabled": False}},
}))


@pytest.mark.engine
@pytest.mark.timeout(120)
@schema.exclude(path=ENDLESS).parametrize()
@settings(max_examples=40, deadline=timedelta(seconds=REQUEST_TIMEOUT + 5), derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], database=None)
def test_the_admin_api_keeps_to_its_document(case, api_proxy):
    case.call_and_validate(base_url=api_proxy.url, checks=CHECKS, timeout=REQUEST_TIMEOUT)
    assert "Traceback" not in api_proxy.log()


@pytest.mark.engine
def test_every_lifecycle_answer_keeps_to_the_document(api_proxy):
    """The answers random inputs rarely reach (a start that waits until ready or past its
    deadline, a stop of a running container), walked in order and held to the document."""
    def call(path: str, method: str, expected: int, service_id: str = "llm", as_text: bool = False, **query):
        case = schema[path][method].Case(path_parameters={"service_id": service_id}, query=query or None)
        response = case.call_and_validate(base_url=api_proxy.url, checks=CHECKS, timeout=REQUEST_TIMEOUT)
        assert response.status_code == expected, response.text
        return response.text if as_text else response.json()

    start, stop = "/api/v1/service/{service_id}/start", "/api/v1/service/{service_id}/stop"
    status = "/api/v1/container/{service_id}"
    call(stop, "POST", 200)  # whatever the random run left behind
    call(stop, "POST", 200, service_id="slow")
    assert call("/api/v1/service/{service_id}/logs", "GET", 404)["error"]["code"] == "no_container"
    assert call(status, "GET", 200)["state"] == "stopped"
    assert call(start, "POST", 202)["state"] == "starting"
    assert call(start, "POST", 409)["error"]["code"] == "already_running"
    assert call(stop, "POST", 200)["state"] == "stopped"
    assert call(stop, "POST", 200)["status"] == "not found"
    assert call(start, "POST", 200, wait="true", timeout=REQUEST_TIMEOUT)["ready"] is True
    running = call(status, "GET", 200)
    assert running["ready"] is True and 590 < running["idle_seconds_left"] <= 600, running
    assert (running["aliases"], running["group"], running["exclusive"]) == (["llm:8b", "org/Llm-8B"], "gpu0", True)
    logs = "/api/v1/service/{service_id}/logs"
    assert "LISTENING 8080" in call(logs, "GET", 200, tail=5, timestamps="true", as_text=True)
    assert call(logs, "GET", 400, tail="-1")["error"]["code"] == "invalid_parameter"
    assert call("/api/v1/services", "GET", 200)["services"][0]["status"] == "running"
    assert call(stop, "POST", 200)["exit_code"] is not None
    timed_out = call(start, "POST", 504, service_id="slow", wait="true", timeout=1)["error"]
    assert timed_out["code"] == "start_timeout" and timed_out["last_status"]["ready"] is False
    listed = call("/api/v1/services", "GET", 200)["services"]
    assert [(s["service_id"], s["status"], s["ready"]) for s in listed] == [("llm", "not found", None),
                                                                         ("slow", "running", False)]
    assert call(stop, "POST", 200, service_id="slow")["state"] == "stopped"
    assert "Traceback" not in api_proxy.log()
