"""A second real Docker engine beside the suite's shared one, for tests that freeze, cut off
or lose an engine. The shared engine at /var/run/docker.sock is never stopped, frozen or
restarted: the second dockerd has its own data root, exec root (and so its own managed
containerd, socket and state under it), pid file, API socket and Linux bridge, and leaves
iptables alone (``--iptables=false --ip-masq=false``), so the two engines' rules never
clash; ports published on 127.0.0.1 then go through docker's userland proxy, which is all
the tests need.

The pieces are plain functions (a bridge, start and stop a dockerd with given arguments,
wait until it answers, copy an image into it, freeze it), so an engine in a network
namespace of its own (a "remote host") can be put together from them too. conftest's
``second_engine`` fixture puts ``ENGINE2`` together from them for a test session.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

MAIN_ENGINE = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")  # the shared engine


@dataclass(frozen=True)
class Dockerd:
    """Where one extra dockerd keeps its state, and how it is reached."""

    name: str            # names its data root, exec root, pid file, socket, log and lock
    bridge: str          # a Linux bridge of its own (at most 15 characters)
    bridge_address: str  # the bridge's address and prefix: its containers live behind it

    @property
    def data_root(self) -> Path:  # kept across runs, so its images stay loaded
        return Path("/var/lib") / self.name

    @property
    def exec_root(self) -> Path:  # its managed containerd lives under it
        return Path("/run") / self.name

    @property
    def pidfile(self) -> Path:
        return Path("/run") / f"{self.name}.pid"

    @property
    def socket(self) -> Path:
        return Path("/run") / f"{self.name}.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log_path(self) -> Path:
        return Path("/tmp") / f"{self.name}-dockerd.log"

    @property
    def config_file(self) -> Path:  # empty: /etc/docker/daemon.json, if any, is not this engine's
        return Path("/run") / f"{self.name}.json"

    def args(self) -> list[str]:
        return ["--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                "--pidfile", str(self.pidfile), "-H", self.host, "--config-file", str(self.config_file),
                "--bridge", self.bridge, "--iptables=false", "--ip-masq=false"]


@dataclass(frozen=True)
class RunningEngine:
    spec: Dockerd
    pid: int

    @property
    def host(self) -> str:
        return self.spec.host


ENGINE2 = Dockerd(name="inference-proxy-engine2", bridge="ipx-engine2", bridge_address="10.231.2.1/24")


def missing_abilities() -> str | None:
    """Why a second engine cannot run here, or None."""
    if os.geteuid() != 0:
        return "running a second dockerd needs root"
    for tool in ("ip", "dockerd", "docker"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (tests/setup/ensure_docker.sh installs dockerd and docker)"
    return None


# -- the bridge ---------------------------------------------------------------------------

def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=10, check=check)


def create_bridge(name: str, address: str, netns: str | None = None) -> None:
    """A Linux bridge with this address (``10.0.0.1/24``), up; an existing one is reused."""
    if _ip("link", "show", name, netns=netns, check=False).returncode != 0:
        _ip("link", "add", name, "type", "bridge", netns=netns)
    _ip("addr", "replace", address, "dev", name, netns=netns)
    _ip("link", "set", name, "up", netns=netns)


def delete_bridge(name: str, netns: str | None = None) -> None:
    if _ip("link", "show", name, netns=netns, check=False).returncode == 0:
        _ip("link", "del", name, netns=netns)


# -- dockerd ------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    """A process that runs (a zombie does not; one that is our child is reaped)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def dockerd_pid(pidfile: Path) -> int | None:
    """The live dockerd the pid file names, or None."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        is_dockerd = Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except OSError:
        return None
    return pid if is_dockerd and _alive(pid) else None


def start_dockerd(args: list[str], pidfile: Path, log_path: Path, wrapper: tuple[str, ...] = (),
                  timeout: float = 30.0) -> int:
    """Start dockerd with these arguments (behind ``wrapper``, say ``ip netns exec NS``) in a
    session of its own; its PID, once its pid file names it."""
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%FT%T')} starting dockerd {' '.join(args)} =====\n".encode())
        log.flush()
        proc = subprocess.Popen([*wrapper, "dockerd", *args], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = dockerd_pid(pidfile)
        if pid is not None:
            return pid
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"dockerd did not start ({' '.join(args)}); its log:\n{log_tail(log_path)}")


def wait_until_answers(host: str, timeout: float = 60.0, pid: int | None = None, log_path: Path | None = None):
    """Block until the engine at ``host`` answers a ping, or fail (also when ``pid`` dies)."""
    import docker

    deadline = time.monotonic() + timeout
    while True:
        try:
            with closing(docker.DockerClient(base_url=host, timeout=2)) as client:
                if client.ping():
                    return
        except docker.errors.DockerException:
            pass
        if pid is not None and not _alive(pid):
            raise AssertionError(f"dockerd {pid} died while starting:\n{log_tail(log_path)}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"the engine at {host} did not answer within {timeout} s:\n{log_tail(log_path)}")
        time.sleep(0.2)


def stop_dockerd(pidfile: Path, timeout: float = 30.0) -> None:
    """Stop the dockerd the pid file names (thawed first: a frozen one cannot stop); SIGKILL,
    with its children, when it does not stop in time. Nothing when none runs."""
    pid = dockerd_pid(pidfile)
    if pid is None:
        return
    _signal(pid, signal.SIGCONT)
    _signal(pid, signal.SIGTERM)  # it stops its containers and its managed containerd
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        for child in _children(pid):
            _signal(child, signal.SIGKILL)
        _signal(pid, signal.SIGKILL)
        while _alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # gone meanwhile


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def log_tail(log_path: Path | None, lines: int = 40) -> str:
    if log_path is None or not log_path.exists():
        return "(no log)"
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def thaw(pid: int) -> None:
    _signal(pid, signal.SIGCONT)


@contextmanager
def frozen(pid: int, at_most: float = 10.0):
    """The process stopped with SIGSTOP for the block: a hung engine (the API does not answer,
    its containers and their userland proxies go on). SIGCONT when the block ends, and from a
    watchdog after ``at_most`` seconds whatever happens; ``thawed`` says whether it came."""
    thawed = threading.Event()

    def by_watchdog() -> None:
        thaw(pid)
        thawed.set()

    watchdog = threading.Timer(at_most, by_watchdog)
    watchdog.daemon = True
    os.kill(pid, signal.SIGSTOP)
    watchdog.start()
    try:
        yield thawed
    finally:
        watchdog.cancel()
        thaw(pid)


# -- images and containers ----------------------------------------------------------------

def image_id(host: str, image: str) -> str | None:
    import docker

    with closing(docker.DockerClient(base_url=host, timeout=30)) as client:
        try:
            return client.images.get(image).id
        except docker.errors.ImageNotFound:
            return None


def load_image(image: str, source: str, target: str, timeout: float = 300.0) -> None:
    """Copy the image from one engine to another (docker save | docker load), unless the
    target already has the same image (by id)."""
    wanted = image_id(source, image)
    if wanted is None:
        raise AssertionError(f"{image} is not on {source}: run tests/setup/build_images.sh")
    if image_id(target, image) == wanted:
        return
    save = subprocess.Popen(["docker", "-H", source, "save", image], stdout=subprocess.PIPE)
    try:
        subprocess.run(["docker", "-H", target, "load", "--quiet"], stdin=save.stdout, check=True,
                       capture_output=True, timeout=timeout)
    finally:
        save.stdout.close()
        try:
            save.wait(timeout=10)
        except subprocess.TimeoutExpired:
            save.kill()
    assert image_id(target, image) == wanted, f"{image} did not arrive on {target}"


def remove_containers(host: str, label: str | None = None) -> None:
    """Remove the engine's containers (only those with the label, when given)."""
    import docker

    with closing(docker.DockerClient(base_url=host, timeout=60)) as client:
        for found in client.api.containers(all=True, filters={"label": label} if label else {}):
            try:
                client.api.remove_container(found["Id"], force=True)
            except docker.errors.NotFound:
                pass  # gone meanwhile


@contextmanager
def engine_lock(engine: Dockerd, timeout: float = 120.0):
    """One test session at a time drives this engine (its paths are fixed)."""
    with open(Path("/run") / f"{engine.name}.lock", "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AssertionError(f"another test session held {engine.name} for {timeout} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
