"""Containers on the real engine: the proxy's start and stop APIs next to the docker CLI.

A second proxy instance runs here with the real engine (no DOCKER_HOST override) and a
container prefix of its own; every container made (by the API or by ``docker run``)
carries the label ``io.inference-proxy.instance=<prefix>`` and is removed at the end,
whatever happened.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time
import uuid
from pathlib import Path

from targets import (ROOT, TEST_IMAGE, Stack, free_port, http_status, log, proxy_config, service_entry,
                     start_proxy, wait_until)

SERVICE_ID = "ctr"
STUBBORN_ID = "stubborn"
STUBBORN_IMAGE = "inference-proxy-bench-stubborn:latest"
STUBBORN_STOP_TIMEOUT = 2
_LABEL = "io.inference-proxy.instance"
# The test backend with SIGTERM ignored (its own handler is never installed), so a stop has
# to wait out stop_timeout and kill: the case "stop timeout + 1 s" is about.
_STUBBORN_DOCKERFILE = f"""\
FROM {TEST_IMAGE}
ENTRYPOINT ["python3", "-c", "import runpy, signal, sys; real = signal.signal; \
signal.signal = lambda s, h: real(s, signal.SIG_IGN if s == signal.SIGTERM else h); \
sys.argv[0] = '/app/server.py'; runpy.run_path('/app/server.py', run_name='__main__')"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
"""


def _docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def _post(url: str, timeout: float = 60) -> int | None:
    return http_status(url, timeout=timeout, method="POST")


def _wait_health(port: int, started: float, timeout: float = 30) -> float:
    # Polled every 10 ms straight at the published port, the same way for both ways of starting.
    wait_until(lambda: http_status(f"http://127.0.0.1:{port}/health", timeout=0.5) == 200, timeout,
               "the container's /health", interval=0.01)
    return time.perf_counter() - started


def remove_all(prefix: str) -> int:
    found = _docker("ps", "-aq", "--filter", f"label={_LABEL}={prefix}").stdout.split()
    if found:
        _docker("rm", "-f", *found)
    return len(found)


def unavailable() -> str | None:
    """Why the container part cannot run here, or None."""
    try:
        if _docker("info", "--format", "{{.ServerVersion}}", timeout=15).returncode != 0:
            return "no Docker engine answers (run tests/setup/ensure_docker.sh)"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker CLI unusable: {exc}"
    if _docker("image", "inspect", TEST_IMAGE).returncode != 0:
        return f"image {TEST_IMAGE} missing (run tests/setup/build_images.sh)"
    return None


def set_up() -> str | None:
    """Install and start the engine and build the test image with the test suite's own
    scripts (as ``bash tests/run.sh`` does), when missing; like nginx's install, this
    needs root. None once the engine and image are there, else why not."""
    reason = unavailable()
    if reason is None:
        return None
    if os.geteuid() != 0:
        return f"{reason}; setting it up needs root"
    log(f"{reason}: setting up with tests/setup/ensure_docker.sh and build_images.sh")
    for script in ("ensure_docker.sh", "build_images.sh"):
        done = subprocess.run(["bash", str(ROOT / "tests" / "setup" / script)], capture_output=True, text=True,
                              timeout=1800)
        if done.returncode != 0:
            return f"tests/setup/{script} failed: {(done.stdout + done.stderr).strip()[-500:]}"
    return unavailable()


def _build_stubborn(tmp: Path) -> str | None:
    """Build the SIGTERM-ignoring image (seconds: one metadata layer); None, or why not."""
    context = tmp / "stubborn"
    context.mkdir(exist_ok=True)
    (context / "Dockerfile").write_text(_STUBBORN_DOCKERFILE)
    done = subprocess.run(["docker", "build", "-q", "-t", STUBBORN_IMAGE, str(context)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    return None if done.returncode == 0 else f"docker build failed: {done.stderr.strip()[-300:]}"


def run(stack: Stack, tmp: Path, rounds: int, root: Path, stop_timeout: float = 5) -> dict:
    reason = unavailable()  # run.py called set_up() before the run's time limit began
    if reason:
        log(f"containers skipped: {reason}")
        return {"skipped": reason}
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    port, stubborn_port = free_port(), free_port()
    stubborn_problem = _build_stubborn(tmp)
    services = {SERVICE_ID: service_entry(port, stop_timeout)}
    if stubborn_problem is None:
        services[STUBBORN_ID] = {**service_entry(stubborn_port, STUBBORN_STOP_TIMEOUT), "image": STUBBORN_IMAGE}
    config = proxy_config(free_port(), services, prefix=prefix)
    samples = {name: [] for name in ("api_start_s", "api_ready_s", "api_stop_s",
                                     "cli_run_s", "cli_ready_s", "cli_stop_rm_s", "stubborn_stop_s")}
    proxy = None
    try:
        proxy = start_proxy(stack, tmp, config, name="proxy-engine", root=root, docker_host=None)
        api = f"http://127.0.0.1:{proxy.port}/api/v1/service/{SERVICE_ID}"
        http_status(f"http://127.0.0.1:{proxy.port}/api/v1/services", timeout=30)  # the Docker client is made lazily
        for r in range(rounds):
            for way in (("api", "cli") if r % 2 == 0 else ("cli", "api")):  # alternate who goes first
                if way == "api":
                    started = time.perf_counter()
                    status = _post(f"{api}/start")
                    samples["api_start_s"].append(time.perf_counter() - started)
                    if status != 202:
                        raise RuntimeError(f"start API answered {status}, not 202")
                    samples["api_ready_s"].append(_wait_health(port, started))
                    started = time.perf_counter()
                    status = _post(f"{api}/stop")
                    samples["api_stop_s"].append(time.perf_counter() - started)
                    if status != 200:
                        raise RuntimeError(f"stop API answered {status}, not 200")
                else:
                    name = f"{prefix}-cli-{r}"
                    started = time.perf_counter()
                    done = _docker("run", "-d", "--name", name, "--label", f"{_LABEL}={prefix}",
                                   "-p", f"127.0.0.1:{port}:8080", TEST_IMAGE, "--host", "0.0.0.0", "--port", "8080")
                    samples["cli_run_s"].append(time.perf_counter() - started)
                    if done.returncode != 0:
                        raise RuntimeError(f"docker run failed: {done.stderr.strip()}")
                    samples["cli_ready_s"].append(_wait_health(port, started))
                    started = time.perf_counter()
                    _docker("stop", "-t", str(int(stop_timeout)), name)
                    _docker("rm", "-f", name)
                    samples["cli_stop_rm_s"].append(time.perf_counter() - started)
            if stubborn_problem is None:  # SIGTERM ignored: the stop waits stop_timeout, then kills
                stubborn = f"http://127.0.0.1:{proxy.port}/api/v1/service/{STUBBORN_ID}"
                if _post(f"{stubborn}/start") != 202:
                    raise RuntimeError("start API refused the SIGTERM-ignoring service")
                _wait_health(stubborn_port, time.perf_counter())
                started = time.perf_counter()
                status = _post(f"{stubborn}/stop")
                samples["stubborn_stop_s"].append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"stop API answered {status} for the SIGTERM-ignoring service")
            log(f"containers round {r + 1}/{rounds}: start API {samples['api_start_s'][-1] * 1000:.0f} ms, "
                f"docker run -d {samples['cli_run_s'][-1] * 1000:.0f} ms")
    finally:
        removed = remove_all(prefix)
        if proxy is not None:
            stack.stop(proxy.proc)
        if stubborn_problem is None:
            _docker("rmi", STUBBORN_IMAGE)  # one metadata layer: rebuilt in seconds next time
        if removed:
            log(f"removed {removed} leftover container(s) labelled {_LABEL}={prefix}")
    summary = {key: {"median": statistics.median(values), "max": max(values), "samples": values}
               for key, values in samples.items() if values}
    summary["stop_timeout_s"] = stop_timeout
    summary["stubborn_stop_timeout_s"] = STUBBORN_STOP_TIMEOUT
    if stubborn_problem:
        summary["stubborn_skipped"] = stubborn_problem
    summary["prefix"] = prefix
    return summary
