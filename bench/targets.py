"""Start, watch and stop what the benchmark measures: the test backend, the proxy under
gunicorn (the shipped gunicorn.conf.py) and nginx, all on 127.0.0.1.

Every process started here is registered with a ``Stack`` and stopped by its PID when the
stack closes, whatever happened (also on Ctrl-C or the run's deadline). CPU time and
memory are read from /proc, so nothing beyond the standard library is needed.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BACKEND_SCRIPT = ROOT / "tests" / "backend" / "server.py"
TEST_IMAGE = "inference-proxy-test-backend:latest"
NO_ENGINE = "unix:///nonexistent/docker.sock"  # the proxy forwards without an engine
SERVICE = "bench"
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_nofile() -> None:
    """Children inherit it: gunicorn and the backend hold a socket per stream."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def http_status(url: str, timeout: float = 1.0, method: str = "GET") -> int | None:
    # urllib, not requests: no proxy variables may reroute loopback (handler with no proxies).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with opener.open(request, timeout=timeout) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- /proc


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (all threads) of these processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone: its time is lost, which the caller sees as a short figure
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / _TICKS


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError):
        return 0


def private_bytes(pid: int) -> int:
    """Pages only this process holds (RSS less what it shares, e.g. libraries, with the
    master): what one more worker would really add."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(line.split()[1]) * 1024 for line in text.splitlines()
               if line.startswith(("Private_Clean:", "Private_Dirty:")))


# ---------------------------------------------------------------- processes


class Stack:
    """The processes this run started; ``close`` stops them by PID, newest first."""

    def __init__(self):
        self._procs: list[tuple[str, subprocess.Popen, int, float]] = []

    def add(self, name: str, proc: subprocess.Popen, stop_signal: int = signal.SIGTERM, grace: float = 10.0):
        self._procs.append((name, proc, stop_signal, grace))
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        for entry in list(self._procs):
            if entry[1] is proc:
                self._procs.remove(entry)
                _stop(*entry)

    def close(self) -> None:
        while self._procs:
            _stop(*self._procs.pop())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stop(name: str, proc: subprocess.Popen, stop_signal: int, grace: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(stop_signal)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) did not stop within {grace:g} s; killing it")
        proc.kill()
        proc.wait(5)


@dataclass
class Target:
    """Something the load client aims at: a port, a path prefix in front of the backend's
    paths, and (not for direct) the process tree whose CPU and memory count."""

    name: str
    port: int
    prefix: str
    proc: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid, *children(self.proc.pid)]

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        if self.extra.get("single"):  # one process does the work (the relay floor)
            return [self.proc.pid]
        return children(self.proc.pid)

    def worker_pid(self) -> int | None:
        pids = self.worker_pids()
        return pids[0] if pids else None

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def worker_rss(self) -> int:
        """The largest worker's RSS (with --workers above 1, streams split between them)."""
        return max((rss_bytes(pid) for pid in self.worker_pids()), default=0)

    def worker_private(self) -> int:
        return max((private_bytes(pid) for pid in self.worker_pids()), default=0)


def start_backend(stack: Stack, tmp: Path) -> Target:
    port_file = tmp / "backend.port"
    proc = stack.add("backend", subprocess.Popen(
        [sys.executable, str(BACKEND_SCRIPT), "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "backend.log", "wb")), grace=5)
    wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 20, "the backend's port file")
    port = int(port_file.read_text())
    wait_until(lambda: http_status(f"http://127.0.0.1:{port}/health") == 200, 20, "the backend's /health")
    return Target("direct", port, "", None, {"backend": proc})


def proxy_config(port: int, services: dict, *, prefix: str | None = None, log_level: str = "INFO") -> dict:
    server = {"host": "127.0.0.1", "port": port, "log_level": log_level}
    if prefix:
        server["container_prefix"] = prefix
    return {"server": server, "services": services}


def service_entry(port: int, stop_timeout: float = 5) -> dict:
    return {"type": "llama-cpp-server", "image": TEST_IMAGE, "port": port,
            "args": ["--host", "0.0.0.0", "--port", "8080"], "stop_timeout": stop_timeout}


def start_proxy(stack: Stack, tmp: Path, config: dict, *, name: str = "proxy", root: Path = ROOT,
                docker_host: str | None = NO_ENGINE, workers: int = 1) -> Target:
    """gunicorn -c gunicorn.conf.py wsgi:app in ``root`` (the repo, or a scratch copy)."""
    port = config["server"]["port"]
    config_path = tmp / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PROXY_CONFIG": str(config_path), "PROXY_WORKERS": str(workers),
           "PROXY_GRACEFUL_TIMEOUT": "5", "PYTHONDONTWRITEBYTECODE": "1"}
    if docker_host:
        env["DOCKER_HOST"] = docker_host
    log_path = tmp / f"{name}.log"
    proc = stack.add(name, subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], cwd=root, env=env,
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT), grace=15)

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        return http_status(f"http://127.0.0.1:{port}/healthz") == 200 and len(children(proc.pid)) == workers
    wait_until(up, 60, f"{name}'s /healthz")
    return Target(name, port, f"/service/{SERVICE}", proc, {"log": log_path})


def start_stack_floor(stack: Stack, tmp: Path, backend_port: int, app: str = "app", name: str = "stack") -> Target:
    """bench/stack_floor.py under gunicorn with the shipped settings that shape its cost
    (gevent, one worker, 4,096 connections, keep-alive 5 s): the fixed stack's own cost.
    ``app`` picks one of its thinner layers instead (see bench/layers.py)."""
    port = free_port()
    log_path = tmp / f"{name}.log"
    env = {**os.environ, "BACKEND_PORT": str(backend_port), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = stack.add(name, subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--worker-class", "gevent", "--workers", "1", "--worker-connections", "4096",
         "--keep-alive", "5", "--backlog", "4096", "--graceful-timeout", "5", "--control-socket", str(tmp / f"{name}.ctl"),
         "--bind", f"127.0.0.1:{port}", "--chdir", str(BENCH), f"stack_floor:{app}"],
        env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT), grace=15)

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        return http_status(f"http://127.0.0.1:{port}/service/{SERVICE}/health") == 200 and len(children(proc.pid)) == 1
    wait_until(up, 60, name)
    return Target(name, port, f"/service/{SERVICE}", proc, {"log": log_path})


def start_relay(stack: Stack, tmp: Path, backend_port: int) -> Target:
    """bench/relay_floor.py: the cost of a bare gevent byte relay, for comparison."""
    port_file = tmp / "relay.port"
    proc = stack.add("relay", subprocess.Popen(
        [sys.executable, str(BENCH / "relay_floor.py"), "--backend-port", str(backend_port), "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "relay.log", "wb")), grace=5)
    wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 20, "the relay's port file")
    port = int(port_file.read_text())
    wait_until(lambda: http_status(f"http://127.0.0.1:{port}/health") == 200, 20, "the relay")
    return Target("relay", port, "", proc, {"single": True})


# ---------------------------------------------------------------- nginx


def ensure_nginx() -> str:
    """nginx from Debian's packages, installed when missing (apt-get update first)."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("nginx is missing and installing it needs root: apt-get install -y nginx")
    log("nginx missing; installing Debian's package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "nginx"], check=True, env=env, timeout=900, stdout=subprocess.DEVNULL)
    return shutil.which("nginx") or "/usr/sbin/nginx"


NGINX_CONF = """\
# Generated by bench/targets.py: a foreground nginx with its own paths, not the system service.
daemon off;
master_process on;
worker_processes 1;                # one worker, like PROXY_WORKERS=1
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections 8192;       # 1,000 streams take 2,000 connections (client + upstream)
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 1000000;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 1024;            # idle upstream connections kept, like the proxy's pool
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /service/{service}/ {{
            proxy_pass http://backend/;    # strips the prefix, as the proxy does
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;           # stream each chunk as it comes
            proxy_request_buffering off;   # stream uploads too, as the proxy does
            client_max_body_size 0;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(stack: Stack, tmp: Path, backend_port: int, binary: str) -> Target:
    import resource

    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, backend_port=backend_port, service=SERVICE,
                                      nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    proc = stack.add("nginx", subprocess.Popen(
        [binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "nginx-stderr.log", "wb")), stop_signal=signal.SIGTERM)

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}: {(tmp / 'nginx-stderr.log').read_text()}")
        return http_status(f"http://127.0.0.1:{port}/service/{SERVICE}/health") == 200 and children(proc.pid)
    wait_until(up, 20, "nginx")
    return Target("nginx", port, f"/service/{SERVICE}", proc)
