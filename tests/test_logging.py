"""The proxy's log, through real gunicorn: one format for every line, what is logged at which
level, secrets never logged, start-up, stop and container start failures.

One proxy run per log level is shared by the tests of this module: start, a fixed set of
requests (one carrying secrets in its Authorization header, its query and the config's
environment), SIGTERM, then the tests read its output.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from conftest import (BACKEND_SCRIPT, NO_ENGINE, ROOT, Proxy, free_port, service_entry, skip_outside_ci, stop_process,
                      wait_for_proxy, wait_until)
from proxy.log import redact

LINE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} \| (DEBUG|INFO|WARNING|ERROR|CRITICAL) *\| .*")
BEARER_SECRET = "sk-secret-123"
QUERY_SECRET = "sk-secret-456"
ENV_SECRET = "env-secret-7f3e9c1d"  # the value of ${SECRET_TOKEN} in the config
SECRETS = [BEARER_SECRET, QUERY_SECRET, ENV_SECRET]
CLOSE = {"Connection": "close"}  # idle keep-alive connections would hold up the stop


def _start_gunicorn(config: dict, tmp: Path, **env: str) -> Proxy:
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp / "proxy.log"
    proc_env = {name: value for name, value in os.environ.items() if name not in ("PROXY_CONFIG", "PROXY_LOG_LEVEL")}
    proc_env.update(PROXY_CONFIG=str(config_path), PROXY_WORKERS="1", PROXY_GRACEFUL_TIMEOUT="5",
                    SECRET_TOKEN=ENV_SECRET, **env)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                cwd=ROOT, env=proc_env, stdout=log, stderr=subprocess.STDOUT)
    return Proxy(proc, config["server"]["port"], log_path, config_path, proc_env)


def _secret_request(proxy: Proxy, method: str, path: str) -> requests.Response:
    return requests.request(method, f"{proxy.url}{path}?api_key={QUERY_SECRET}&stream=true", timeout=15,
                            headers={"Authorization": f"Bearer {BEARER_SECRET}", **CLOSE})


@dataclass
class Run:
    level: str
    log: str
    exit_status: int
    answers: dict  # name -> (status, error code or None)
    backend_port: int
    config_path: Path

    def lines(self, level: str | None = None) -> list[str]:
        return [line for line in self.log.splitlines() if level is None or f"| {level: <8} |" in line]


# The requests every run makes: name -> (method, path). All carry the three secrets.
REQUESTS = {
    "forwarded": ("GET", "/service/llm/v1/models"),
    "backend_down": ("POST", "/service/down/v1/chat/completions"),
    "unknown_url": ("GET", "/no/such/url"),
    "unknown_service": ("GET", "/service/nope/v1/models"),
    "volume_missing": ("POST", "/api/v1/service/vol/start"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the proxy once per log level (on first use) and keep what it logged."""
    done: dict[str, Run] = {}
    backends: list[subprocess.Popen] = []

    def run(level: str) -> Run:
        if level in done:
            return done[level]
        tmp = tmp_path_factory.mktemp(f"log-{level.lower()}")
        port_file = tmp / "backend.port"
        backend = subprocess.Popen([sys.executable, str(BACKEND_SCRIPT), "--host", "127.0.0.1", "--port", "0",
                                    "--port-file", str(port_file)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        backends.append(backend)
        wait_until(lambda: port_file.exists() and port_file.read_text().strip(), what="backend port file")
        backend_port = int(port_file.read_text())
        config = {
            "server": {"host": "127.0.0.1", "port": free_port(), "log_level": level},
            "services": {
                "llm": service_entry(backend_port, environment={"HF_TOKEN": "${SECRET_TOKEN}"}),
                "down": service_entry(free_port(), timeouts={"connect": 2, "read": 5}),
                "vol": service_entry(free_port(), volumes=[f"/nonexistent-{uuid.uuid4().hex}:/models:ro"]),
            },
        }
        proxy = _start_gunicorn(config, tmp, DOCKER_HOST=NO_ENGINE)
        try:
            wait_for_proxy(proxy)
            answers = {}
            for name, (method, path) in REQUESTS.items():
                answer = _secret_request(proxy, method, path)
                code = answer.json()["error"]["code"] if answer.status_code >= 400 else None
                answers[name] = (answer.status_code, code)
        finally:
            exit_status = stop_process(proxy.proc, grace=20)
        done[level] = Run(level, proxy.log(), exit_status, answers, backend_port, proxy.config_path)
        return done[level]

    yield run
    for backend in backends:
        backend.terminate()
        backend.wait(5)


LEVELS = pytest.mark.parametrize("level", ["DEBUG", "INFO"])


@LEVELS
def test_the_run_got_the_expected_answers(runs, level):
    # The other tests read this run's log; first make sure each request did what it should.
    assert runs(level).answers == {
        "forwarded": (200, None),
        "backend_down": (502, "upstream_unreachable"),
        "unknown_url": (404, "not_found"),
        "unknown_service": (404, "service_not_found"),
        "volume_missing": (500, "volume_missing"),
    }


@LEVELS
def test_every_output_line_has_the_log_format(runs, level):
    run = runs(level)
    lines = run.log.splitlines()
    assert lines, "the proxy logged nothing"
    assert [line for line in lines if not LINE.fullmatch(line)] == []
    # gunicorn's own lines go through the same sink.
    assert any(re.search(r"\| INFO     \| Listening at: http://127\.0\.0\.1:\d+ ", line) for line in lines)
    assert any(re.search(r"\| INFO     \| Booting worker with pid: \d+$", line) for line in lines)


@LEVELS
def test_loaded_config_is_logged(runs, level):
    run = runs(level)
    assert f"| INFO     | configuration loaded from {run.config_path}: 3 service(s)" in run.log


@LEVELS
def test_sigterm_stops_cleanly_and_logs_the_stop(runs, level):
    run = runs(level)
    assert run.exit_status == 0
    assert "| INFO     | Handling signal: term" in run.log
    assert run.lines()[-1].endswith("| INFO     | inference proxy stopped")


@LEVELS
def test_secrets_never_reach_the_log(runs, level):
    run = runs(level)
    for secret in SECRETS:
        assert secret not in run.log
    assert "Traceback" not in run.log


@LEVELS
def test_missing_volume_start_failure_is_logged_as_a_warning(runs, level):
    run = runs(level)
    assert any(re.search(r"\| WARNING  \| 500 volume_missing vol: Bind-mount source '/nonexistent-[0-9a-f]+' "
                         r"does not exist$", line) for line in run.lines())


def test_debug_logs_each_request_with_method_path_status_and_duration(runs):
    lines = runs("DEBUG").lines("DEBUG")
    for name, (method, path) in REQUESTS.items():
        status = runs("DEBUG").answers[name][0]
        pattern = rf"\| DEBUG    \| {method} {re.escape(path)} -> {status} in \d+\.\d ms$"
        assert any(re.search(pattern, line) for line in lines), f"no request line for {name}"


def test_debug_logs_each_forward_with_its_target_without_the_query(runs):
    run = runs("DEBUG")
    target = f"http://127.0.0.1:{run.backend_port}/v1/models"
    forwards = [line for line in run.lines("DEBUG") if f"| forward GET llm -> {target}" in line]
    assert len(forwards) == 1
    assert forwards[0].endswith(target)


def test_info_does_not_log_each_request(runs):
    run = runs("INFO")
    assert run.lines("DEBUG") == []
    assert not any("/v1/models ->" in line or "| forward " in line for line in run.lines())


def test_upstream_failure_is_logged_with_query_values_masked(runs):
    # The exception text from requests names the URL with its query: the sink masks it.
    warnings = [line for line in runs("INFO").lines("WARNING") if "service down at 127.0.0.1:" in line]
    assert len(warnings) == 1
    assert "/v1/chat/completions?api_key=***&stream=***" in warnings[0]


# -- the masking itself ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("-> http://h:1/v1/x?api_key=k1&stream=true", "-> http://h:1/v1/x?api_key=***&stream=***"),
    ("url: /v1?key=abc==&flag (Caused by X)", "url: /v1?key=***&flag (Caused by X)"),
    ("'http://h/p?token=t#frag'", "'http://h/p?token=***#frag'"),
    ("Authorization: Bearer sk-1.2_3, next", "Authorization: Bearer ***, next"),
    ("is it running? yes, a=b", "is it running? yes, a=b"),
    ("GET /service/llm/v1/models -> 200 in 1.0 ms", "GET /service/llm/v1/models -> 200 in 1.0 ms"),
])
def test_log_text_masks_query_values_and_bearer_tokens(text, expected):
    assert redact(text) == expected


# -- container start failures on the real engine ------------------------------------------

@pytest.fixture(scope="module")
def engine_proxy(docker_client, tmp_path_factory):
    """A proxy on the real engine with services that cannot start; its containers are
    removed afterwards."""
    prefix = f"iptest-{uuid.uuid4().hex[:8]}"
    taken = socket.socket()  # a host port already in use, so Docker cannot publish it
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    services = {
        "port-taken": service_entry(taken.getsockname()[1], environment={"HF_TOKEN": "${SECRET_TOKEN}"}),
        "bad-args": service_entry(free_port(), args=["--no-such-flag"], environment={"HF_TOKEN": "${SECRET_TOKEN}"}),
        "gpus": service_entry(free_port(), resources={"gpus": "all"}, environment={"HF_TOKEN": "${SECRET_TOKEN}"}),
    }
    config = {"server": {"host": "127.0.0.1", "port": free_port(), "log_level": "INFO", "container_prefix": prefix},
              "services": services}
    env = {} if "DOCKER_HOST" not in os.environ else {"DOCKER_HOST": os.environ["DOCKER_HOST"]}
    proxy = _start_gunicorn(config, tmp_path_factory.mktemp("engine-log"), **env)
    try:
        wait_for_proxy(proxy)
        yield proxy
    finally:
        stop_process(proxy.proc, grace=20)
        taken.close()
        label = f"io.inference-proxy.instance={prefix}"
        for container in docker_client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)


@pytest.mark.engine
@pytest.mark.parametrize("service_id, query, status, code, logged", [
    pytest.param("port-taken", "", 500, "start_failed",
                 r"\| ERROR    \| container iptest-[0-9a-f]+-port-taken failed to start: .*address already in use",
                 id="docker-refuses-the-start"),
    pytest.param("bad-args", "?wait=true&timeout=60", 500, "container_exited",
                 r"\| ERROR    \| starting bad-args failed: Container 'bad-args' exited while starting \(exit code 2\)$",
                 id="container-exits-while-starting"),
    pytest.param("gpus", "", 500, "start_failed",
                 r"\| ERROR    \| container iptest-[0-9a-f]+-gpus failed to start: "
                 r"could not select device driver .* with capabilities: \[\[gpu\]\]",
                 id="gpus-without-nvidia-runtime"),
])
def test_container_start_failure_is_logged_as_an_error(docker_client, engine_proxy, service_id, query, status,
                                                       code, logged):
    if service_id == "gpus" and "nvidia" in (docker_client.info().get("Runtimes") or {}):
        skip_outside_ci("this engine has an NVIDIA runtime: a GPU request may succeed")
    answer = requests.post(f"{engine_proxy.url}/api/v1/service/{service_id}/start{query}", headers=CLOSE, timeout=90)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["service_id"], error["source"]) == (code, service_id, "proxy")
    assert any(re.search(logged, line) for line in engine_proxy.log().splitlines()), engine_proxy.log()
    for secret in SECRETS:
        assert secret not in engine_proxy.log()
