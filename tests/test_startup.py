"""Start-up, end to end: what `gunicorn -c gunicorn.conf.py wsgi:app` and `python -m proxy check`
do with bad and good configs, the shipped config under real gunicorn with and without a
Docker engine, and the one error envelope for every error the proxy makes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests
import yaml

from conftest import NO_ENGINE, ROOT, Proxy, free_port, service_entry, stop_process, wait_for_proxy, wait_until
from proxy import __version__
from proxy.errors import ERROR_TYPES

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
UNSET_VARIABLE = "PROXY_TEST_SURELY_UNSET_VARIABLE"
# A bad config is refused in well under a second; a hang means it was wrongly accepted.
REFUSAL_TIMEOUT = 30
# gunicorn's gevent worker waits (up to `keepalive`) for idle keep-alive connections at stop.
CLOSE = {"Connection": "close"}


def _clean_env(**extra: str) -> dict:
    """The test's environment without anything that would pick another config or level."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PROXY_CONFIG", "PROXY_LOG_LEVEL", UNSET_VARIABLE)}
    env.update(PYTHONPATH=str(ROOT), DOCKER_HOST=NO_ENGINE, PROXY_WORKERS="1", **extra)
    return env


def _service_yaml(service_id: str, port: int, **lines: str) -> str:
    extra = "".join(f"    {key}: {value}\n" for key, value in lines.items())
    return (f"  {service_id}:\n    type: llama-cpp-server\n    image: img-{service_id}:1\n"
            f"    port: {port}\n{extra}")


def _run(command: list[str], *, cwd=ROOT, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=REFUSAL_TIMEOUT)


def _launch(config_path, log_path, env: dict) -> Proxy:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(GUNICORN, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    port = yaml.safe_load(config_path.read_text())["server"]["port"]
    return Proxy(proc, port, log_path, config_path, env)


# -- UC-03: a bad config stops start-up with one clear line, never a traceback -----------

# Each config has exactly one problem (after a server section on a free port, so a config
# that were wrongly accepted would not bind the default port). {path} is the file's path.
BAD_CONFIGS = [
    pytest.param("services:\n  x:\n    type: llama-cpp-server\n    image: a: b\n",
                 "{path}: line 6, column 13: mapping values are not allowed here",
                 id="yaml-syntax-error-names-line-and-column"),
    pytest.param("services:\n  x:\n    type: llama-cpp-server\n    image: img\n",
                 "{path}: services.x.port: Missing data for required field.",
                 id="missing-port"),
    pytest.param("services:\n  x:\n    type: vllm\n    image: img\n    port: 8081\n",
                 "{path}: services.x.type: Must be one of: llama-cpp-server.",
                 id="unknown-type-lists-the-allowed-ones"),
    pytest.param("services:\n" + _service_yaml("x", 70000),
                 "{path}: services.x.port: Must be greater than or equal to 1 and less than or equal to 65535.",
                 id="port-out-of-range"),
    pytest.param("services:\n" + _service_yaml("a", 8081) + _service_yaml("b", 8081),
                 "{path}: services.b.port: Port 8081 is already used by service 'a'.",
                 id="duplicate-ports"),
    pytest.param("services:\n" + _service_yaml("x", 8081, gpu="all"),
                 "{path}: services.x.gpu: Unknown field.",
                 id="unknown-key"),
    pytest.param("services:\n" + _service_yaml("x", 8081, environment=f"{{TOKEN: '${{{UNSET_VARIABLE}}}'}}"),
                 "{path}: services.x.environment.TOKEN: Environment variable "
                 f"'{UNSET_VARIABLE}' is not set (use ${{{UNSET_VARIABLE}:-default}} for a default).",
                 id="unset-variable"),
]

STARTERS = {
    "gunicorn": lambda path: (GUNICORN, {"PROXY_CONFIG": str(path)}),
    "check": lambda path: ([sys.executable, "-m", "proxy", "check", "--config", str(path)], {}),
    "serve": lambda path: ([sys.executable, "-m", "proxy", "serve", "--config", str(path)], {}),
}


@pytest.mark.parametrize("starter", list(STARTERS))
@pytest.mark.parametrize("body, expected", BAD_CONFIGS)
def test_bad_config_exits_1_with_its_message_and_no_traceback(tmp_path, starter, body, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(f"server:\n  port: {free_port()}\n" + body)
    command, env = STARTERS[starter](path)
    result = _run(command, env=_clean_env(**env))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert result.stderr.splitlines() == [expected.replace("{path}", str(path))]
    assert "Traceback" not in output
    if starter == "gunicorn":
        assert "Booting worker" not in output and "Listening at" not in output
        assert f"| ERROR    | configuration rejected: {path}" in result.stdout


def test_check_summarises_a_good_config_and_exits_0(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("server:\n  port: 12000\n  log_level: debug\nservices:\n"
                    + _service_yaml("llama3", 8081, resources="{gpus: all}")
                    + _service_yaml("small", 8082, resources="{gpus: [0, 'GPU-3f2a']}")
                    + _service_yaml("cpu-only", 8083))
    result = _run([sys.executable, "-m", "proxy", "check", "--config", str(path)], env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}: OK",
        "server: 127.0.0.1:12000 (log level DEBUG)",
        "services: 3",
        "  llama3: image img-llama3:1, port 127.0.0.1:8081 -> 8080, gpus all",
        "  small: image img-small:1, port 127.0.0.1:8082 -> 8080, gpus 0,GPU-3f2a",
        "  cpu-only: image img-cpu-only:1, port 127.0.0.1:8083 -> 8080, gpus none",
    ]
    assert result.stderr == ""


@pytest.mark.parametrize("use_flag, use_env, chosen", [
    (True, False, "from-flag"),
    (False, True, "from-env"),
    (True, True, "from-flag"),   # --config wins over PROXY_CONFIG
    (False, False, "from-cwd"),  # neither: ./config.yaml
])
def test_check_reads_config_from_flag_then_env_then_working_directory(tmp_path, use_flag, use_env, chosen):
    paths = {}
    for index, name in enumerate(("from-flag", "from-env", "from-cwd")):
        paths[name] = tmp_path / ("config.yaml" if name == "from-cwd" else f"{name}.yaml")
        paths[name].write_text("services:\n" + _service_yaml(name, 8081 + index))
    command = [sys.executable, "-m", "proxy", "check"] + (["--config", str(paths["from-flag"])] if use_flag else [])
    env = _clean_env(**({"PROXY_CONFIG": str(paths["from-env"])} if use_env else {}))
    result = _run(command, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected_source = "config.yaml" if chosen == "from-cwd" else str(paths[chosen])
    assert lines[0] == f"{expected_source}: OK"
    assert [line.split(":")[0].strip() for line in lines[3:]] == [chosen]


# -- the shipped config under real gunicorn -------------------------------------------------

@pytest.fixture
def shipped_config(tmp_path):
    """The shipped config.yaml, with only server.port moved to a free port."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["server"]["port"] = free_port()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("engine", ["real", "unreachable"])
def test_shipped_config_serves_healthz_with_and_without_an_engine(request, tmp_path, shipped_config, engine):
    env = _clean_env(PROXY_CONFIG=str(shipped_config), PROXY_GRACEFUL_TIMEOUT="5")
    if engine == "real":
        request.getfixturevalue("docker_client")  # skips on a laptop without an engine, fails in CI
        if "DOCKER_HOST" in os.environ:
            env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
        else:
            del env["DOCKER_HOST"]
    proxy = _launch(shipped_config, tmp_path / "proxy.log", env)
    try:
        wait_for_proxy(proxy)
        answer = requests.get(f"{proxy.url}/healthz", headers=CLOSE, timeout=10)
        assert answer.status_code == 200
        health = answer.json()
        assert health["version"] == __version__
        assert health["docker_reachable"] is (engine == "real")
        if engine == "unreachable":
            wait_until(lambda: "| WARNING  | Docker engine not reachable" in proxy.log(),
                       timeout=10, what="a warning that the engine is not reachable")
    finally:
        stop_process(proxy.proc, grace=15)
    assert "Traceback" not in proxy.log()


# -- every error the proxy makes has the one envelope -------------------------------------

@pytest.fixture(scope="module")
def bare_proxy(tmp_path_factory):
    """A proxy with one service 'llm' whose port has nothing listening, and no engine."""
    tmp = tmp_path_factory.mktemp("envelope")
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": free_port(), "log_level": "INFO"},
        "services": {"llm": service_entry(free_port(), timeouts={"connect": 2, "read": 5})},
    }))
    proxy = _launch(config_path, tmp / "proxy.log", _clean_env(PROXY_CONFIG=str(config_path),
                                                               PROXY_GRACEFUL_TIMEOUT="5"))
    try:
        wait_for_proxy(proxy)
        yield proxy
    finally:
        stop_process(proxy.proc, grace=15)


@pytest.mark.parametrize("method, path, status, code, service_id", [
    pytest.param("GET", "/no/such/url", 404, "not_found", None, id="flask-404-unknown-url"),
    pytest.param("DELETE", "/healthz", 405, "method_not_allowed", None, id="flask-405-wrong-method"),
    pytest.param("PUT", "/api/v1/services", 405, "method_not_allowed", None, id="flask-405-on-admin-route"),
    pytest.param("GET", "/service/nope/x", 404, "service_not_found", "nope", id="unknown-service"),
    pytest.param("POST", "/api/v1/service/nope/start", 404, "service_not_found", "nope",
                 id="unknown-service-on-admin-route"),
    pytest.param("POST", "/service/llm/v1/chat/completions", 502, "upstream_unreachable", "llm",
                 id="backend-not-listening"),
])
def test_every_proxy_error_has_the_envelope(bare_proxy, method, path, status, code, service_id):
    answer = requests.request(method, f"{bare_proxy.url}{path}", json={"model": "m"}, headers=CLOSE,
                              timeout=10)
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    error = answer.json()["error"]
    assert {"message", "type", "code", "service_id", "source"} <= set(error)
    assert error["source"] == "proxy"
    assert error["code"] == code
    assert error["type"] == ERROR_TYPES[status]
    assert error["service_id"] == service_id
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("path, allowed", [("/healthz", {"GET", "HEAD", "OPTIONS"}),
                                           ("/api/v1/services", {"GET", "HEAD", "OPTIONS"}),
                                           ("/api/v1/service/llm/start", {"POST", "OPTIONS"})])
def test_405_keeps_its_allow_header(bare_proxy, path, allowed):
    answer = requests.patch(f"{bare_proxy.url}{path}", headers=CLOSE, timeout=10)
    assert answer.status_code == 405
    assert answer.json()["error"]["code"] == "method_not_allowed"
    assert {method.strip() for method in answer.headers["Allow"].split(",")} == allowed
