"""A byte relay between the proxy and the real Docker socket, for tests that take the
engine away and bring it back without touching the shared dockerd, and that count the
Docker API traffic the proxy makes."""
from __future__ import annotations

import os
import socket
import threading

DOCKER_SOCKET = "/var/run/docker.sock"


class DockerRelay:
    def __init__(self, path: str, target: str = DOCKER_SOCKET):
        self.path = path
        self.target = target
        self.requests_seen = 0  # bytes that looked like the start of an HTTP request
        self.connections: list[dict] = []  # each: "requests" (its request lines) and whether still "open"
        self._listener: socket.socket | None = None
        self._links: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def docker_host(self) -> str:
        return f"unix://{self.path}"

    def start(self) -> "DockerRelay":
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(64)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """The engine 'goes away': no new connections, and open ones are cut."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            try:
                link.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            link.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            record = {"requests": [], "open": True}
            with self._lock:
                self._links += [client, upstream]
                self.connections.append(record)
            threading.Thread(target=self._pump, args=(client, upstream, True, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False, record), daemon=True).start()

    def _from_proxy(self, data: bytes) -> None:
        """Sees each piece the proxy sends before it goes on (subclasses may hold it)."""
        if data[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE"):
            self.requests_seen += 1

    def _pump(self, source: socket.socket, sink: socket.socket, from_proxy: bool, record: dict) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if from_proxy:
                    self._from_proxy(data)
                    if data[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE"):
                        record["requests"].append(data.split(b"\r\n", 1)[0])
                sink.sendall(data)
        except OSError:
            pass
        finally:
            if from_proxy:
                record["open"] = False  # the proxy closed it (or the engine did)
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
