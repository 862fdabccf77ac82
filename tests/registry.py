"""A real container registry for the image pull tests: Debian's docker-registry
(Distribution 2.8, installed by tests/setup/ensure_registry.sh), run without systemd on
127.0.0.1 and a temporary directory, plus a TCP relay in front of it that can slow the
registry's answers down (for visible progress) and counts the manifest requests (one per
pull).

The Docker engine treats registries on 127.0.0.0/8 as insecure, so plain HTTP works.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import uuid
import warnings
from pathlib import Path

import requests

from conftest import TEST_IMAGE, free_port, skip_outside_ci, stop_process, wait_until

REGISTRY_BINARY = "/usr/bin/docker-registry"
_MANIFEST_REQUEST = re.compile(rb"(?:GET|HEAD) /v2/[^ ]*/manifests/([^ ]+) HTTP/1\.[01]\r\n")


class Registry:
    """``docker-registry serve`` on 127.0.0.1:<free port>, storing under ``workdir``;
    ``users``: {name: password} for basic auth (an htpasswd file), else open."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None):
        if not os.access(REGISTRY_BINARY, os.X_OK):
            skip_outside_ci(f"{REGISTRY_BINARY} is missing: run tests/setup/ensure_registry.sh")
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        auth = ""
        if users:
            htpasswd = workdir / "htpasswd"
            htpasswd.write_text("".join(f"{name}:{_bcrypt(password)}\n" for name, password in users.items()))
            auth = f"auth:\n  htpasswd:\n    realm: ipt\n    path: {htpasswd}\n"
        config = workdir / "config.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n"
                          f"    rootdirectory: {workdir / 'data'}\n  delete:\n    enabled: true\n"
                          f"http:\n  addr: 127.0.0.1:{self.port}\n{auth}")
        self.log_path = workdir / "registry.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited:\n{self.log_path.read_text()}")
            try:
                return requests.get(f"http://127.0.0.1:{self.port}/v2/", timeout=1).status_code in (200, 401)
            except requests.RequestException:
                return False
        wait_until(up, timeout=20, what="the registry")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc, grace=5)


def _bcrypt(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # glibc's crypt does bcrypt, the only scheme the registry's htpasswd takes
        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))


class RegistryRelay:
    """A TCP relay on 127.0.0.1 in front of a registry. ``rate``: bytes per second of its
    answers (None: as fast as they come); ``manifests``: the tags whose manifest was asked
    for, once per request."""

    CHUNK = 16 * 1024

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.rate: float | None = None
        self.manifests: list[str] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def manifest_requests(self, tag: str) -> int:
        return self.manifests.count(tag)

    def stop(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client), daemon=True).start()

    def _requests(self, source: socket.socket, sink: socket.socket) -> None:
        seen = b""
        try:
            while data := source.recv(65536):
                seen = (seen + data)[-8192:]
                for match in _MANIFEST_REQUEST.finditer(seen):
                    self.manifests.append(match.group(1).decode())
                seen = seen[seen.rfind(b"\r\n") + 2:] if b"\r\n" in seen else seen  # each line once
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source, sink)

    def _answers(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(self.CHUNK):
                sink.sendall(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            _close(source, sink)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def push_fresh_image(docker_client, registry: Registry, size_mb: int, tag: str | None = None,
                     auth: dict | None = None) -> tuple[str, str, str]:
    """Push an image that no Docker host has yet: the test image plus a layer of ``size_mb``
    random (incompressible) megabytes, as ipt/backend:<tag>; then remove it here, so that a
    start has to pull that layer. Returns (repository path, tag, image id)."""
    tag = tag or uuid.uuid4().hex[:12]
    repository = f"{registry.host}/ipt/backend"
    writer = docker_client.containers.run(
        TEST_IMAGE, entrypoint=["python3", "-c", f"open('/blob', 'wb').write(__import__('os').urandom({size_mb} << 20))"],
        detach=True)
    try:
        assert writer.wait(timeout=60)["StatusCode"] == 0
        image = writer.commit(repository=repository, tag=tag, changes=[
            'ENTRYPOINT ["python3", "/app/server.py"]', 'CMD ["--host", "0.0.0.0", "--port", "8080"]'])
    finally:
        writer.remove(force=True)
    for message in docker_client.images.push(repository, tag, stream=True, decode=True, auth_config=auth):
        assert "error" not in message, message
    docker_client.images.remove(f"{repository}:{tag}", force=True)
    return "ipt/backend", tag, image.id
