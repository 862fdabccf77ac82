"""Shared fixtures: real backend processes, a real gunicorn proxy, the real Docker engine.

Engine tests may skip on a laptop without Docker, but never in CI (CI=true): there a
missing engine or test image fails the run.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
BACKEND_SCRIPT = ROOT / "tests" / "backend" / "server.py"
TEST_IMAGE = "inference-proxy-test-backend:latest"
IN_CI = os.environ.get("CI", "").lower() == "true"
NO_ENGINE = "unix:///nonexistent/docker.sock"  # DOCKER_HOST for a proxy that must not see an engine

pytest_plugins = ["browser"]  # a real headless browser and a page server (tests/browser.py)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def recv_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    """Read from a raw socket until the marker has arrived (headers and body may come apart)."""
    received = b""
    while marker not in received:
        data = sock.recv(65536)
        if not data or len(received) > limit:
            raise AssertionError(f"connection ended before {marker!r}: {received[:500]!r}")
        received += data
    return received


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """SIGTERM (as systemd or docker stop would), SIGKILL after the grace; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


# -- the test backend as a local process ------------------------------------------------

@dataclass
class Backend:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def disconnects(self, test_id: str) -> list[dict]:
        answer = requests.get(f"{self.url}/_disconnects", params={"test_id": test_id}, timeout=5)
        return answer.json()["disconnects"]

    def stats(self) -> dict:
        return requests.get(f"{self.url}/_stats", timeout=5).json()


class _BackendLauncher:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[subprocess.Popen] = []

    def __call__(self, *flags: str, port: int | None = None) -> Backend:
        port_file = self.workdir / f"backend-{uuid.uuid4().hex}.port"
        proc = subprocess.Popen(
            [sys.executable, str(BACKEND_SCRIPT), "--host", "127.0.0.1", "--port", str(port or 0),
             "--port-file", str(port_file), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started.append(proc)
        wait_until(lambda: port_file.exists() and port_file.read_text().strip(), what="backend port file")
        return Backend(proc, int(port_file.read_text().strip()))

    def stop_all(self) -> None:
        for proc in self.started:
            stop_process(proc, grace=5)


@pytest.fixture
def start_backend(tmp_path):
    """Factory: start the test backend as a process (extra CLI flags allowed)."""
    launcher = _BackendLauncher(tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture
def backend(start_backend) -> Backend:
    return start_backend()


# -- the proxy under real gunicorn --------------------------------------------------------

@dataclass
class Proxy:
    proc: subprocess.Popen
    port: int
    log_path: Path
    config_path: Path
    env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def service_entry(port: int, **overrides) -> dict:
    """A service config for the test image (or a backend process on that port)."""
    entry = {"type": "llama-cpp-server", "image": TEST_IMAGE, "port": port,
             "args": ["--host", "0.0.0.0", "--port", "8080"], "stop_timeout": 5}
    entry.update(overrides)
    return entry


class _ProxyLauncher:
    """Writes a config and runs ``gunicorn -c gunicorn.conf.py wsgi:app`` on it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[Proxy] = []

    def __call__(self, services: dict, *, workers: int = 1, docker_host: str | None = NO_ENGINE,
                 prefix: str | None = None, log_level: str = "DEBUG", env: dict | None = None,
                 wait: bool = True, server_extra: dict | None = None, groups: dict | None = None,
                 port: int | None = None, engines: dict | None = None) -> Proxy:
        port = port or free_port()
        config = {"server": {"host": "127.0.0.1", "port": port, "log_level": log_level}, "services": services}
        if prefix:
            config["server"]["container_prefix"] = prefix
        config["server"].update(server_extra or {})  # more server: keys (admin_token, api_keys, ...)
        if groups is not None:
            config["groups"] = groups
        if engines is not None:
            config["engines"] = engines
        config_path = self.workdir / f"config-{port}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = self.workdir / f"proxy-{port}.log"
        inherited = {k: v for k, v in os.environ.items() if k != "PROXY_LOG_LEVEL"}  # would beat log_level
        proc_env = {**inherited, "PROXY_CONFIG": str(config_path), "PROXY_WORKERS": str(workers),
                    "PROXY_GRACEFUL_TIMEOUT": "5", **(env or {})}
        if docker_host:
            proc_env["DOCKER_HOST"] = docker_host
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                    cwd=ROOT, env=proc_env, stdout=log, stderr=subprocess.STDOUT)
        proxy = Proxy(proc, port, log_path, config_path, proc_env)
        self.started.append(proxy)
        if wait:
            wait_for_proxy(proxy)
        return proxy

    def stop_all(self) -> None:
        for proxy in self.started:
            stop_process(proxy.proc)


@pytest.fixture
def start_proxy(tmp_path):
    """Factory: a proxy under real gunicorn for one test."""
    launcher = _ProxyLauncher(tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_launchers(tmp_path_factory):
    """A backend and proxy factory shared by a module's tests, to save start-up time."""
    workdir = tmp_path_factory.mktemp("shared")
    backends, proxies = _BackendLauncher(workdir), _ProxyLauncher(workdir)
    yield backends, proxies
    proxies.stop_all()
    backends.stop_all()


def wait_for_proxy(proxy: Proxy, timeout: float = 30.0) -> None:
    def up():
        if proxy.proc.poll() is not None:
            raise AssertionError(f"proxy exited with {proxy.proc.returncode}:\n{proxy.log()}")
        try:
            return requests.get(f"{proxy.url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False
    wait_until(up, timeout=timeout, what="the proxy's /healthz")


# -- the real Docker engine ---------------------------------------------------------------

def skip_outside_ci(reason: str):
    """Skip on a developer's machine; in CI, where a skip would pass for a test that ran, fail."""
    if IN_CI:
        pytest.fail(f"CI cannot run this test: {reason}")
    pytest.skip(reason)


def _engine_or_skip(reason: str):
    skip_outside_ci(f"it needs a running Docker engine and the test image: {reason}")


@pytest.fixture(scope="session")
def docker_client():
    import docker

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure here means "no engine"
        _engine_or_skip(f"no Docker engine: {exc}")
    try:
        client.images.get(TEST_IMAGE)
    except docker.errors.ImageNotFound:
        _engine_or_skip(f"test image {TEST_IMAGE} missing: run tests/setup/build_images.sh")
    yield client
    client.close()


@pytest.fixture
def container_prefix(docker_client):
    """A prefix of its own per test; every container under it is removed afterwards."""
    prefix = f"iptest-{uuid.uuid4().hex[:8]}"
    yield prefix
    import docker

    for found in docker_client.api.containers(all=True, filters={"label": f"io.inference-proxy.instance={prefix}"}):
        try:
            docker_client.api.remove_container(found["Id"], force=True)
        except docker.errors.NotFound:
            pass  # the proxy removed it meanwhile (an idle stop, a swap)


@pytest.fixture
def engine_proxy(start_proxy, container_prefix):
    """Factory: a proxy on the real engine whose services run the test image."""
    def start(services: dict | None = None, **kwargs):
        services = services or {"llm": service_entry(free_port())}
        return start_proxy(services, docker_host=kwargs.pop("docker_host", None), prefix=container_prefix, **kwargs)
    return start


# -- a second real Docker engine (tests/engines.py) ----------------------------------------

@pytest.fixture(scope="session")
def second_engine(docker_client):
    """A second dockerd with the test image, beside the shared engine (never touched), for the
    session; stopped, and its bridge deleted, at the end even after a failure."""
    import engines

    missing = engines.missing_abilities()
    if missing:
        skip_outside_ci(f"a second Docker engine cannot run here: {missing}")
    engine = engines.ENGINE2
    with engines.engine_lock(engine):
        try:
            engines.stop_dockerd(engine.pidfile)  # one left behind by a session that was killed
            engines.create_bridge(engine.bridge, engine.bridge_address)
            engine.config_file.write_text("{}\n")
            pid = engines.start_dockerd(engine.args(), engine.pidfile, engine.log_path)
            engines.wait_until_answers(engine.host, pid=pid, log_path=engine.log_path)
            engines.remove_containers(engine.host)  # left by a session that was killed
            engines.load_image(TEST_IMAGE, engines.MAIN_ENGINE, engine.host)
            yield engines.RunningEngine(engine, pid)
        finally:
            engines.stop_dockerd(engine.pidfile)
            engines.delete_bridge(engine.bridge)


@pytest.fixture
def second_engine_prefix(second_engine):
    """A container prefix of its own per test on the second engine; its containers are
    removed afterwards (the engine thawed first, should a test have left it frozen)."""
    import engines

    prefix = f"iptest2-{uuid.uuid4().hex[:8]}"
    yield prefix
    engines.thaw(second_engine.pid)
    engines.remove_containers(second_engine.host, label=f"io.inference-proxy.instance={prefix}")
