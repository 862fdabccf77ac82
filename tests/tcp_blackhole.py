"""tcp:// stand-ins for an engine that cannot be reached, all on 127.0.0.1 and each bounded
in time (they close themselves after ``lifetime`` seconds):

- ``SilentServer`` accepts TCP connections and never says a word (a blackholed address,
  or a hung engine's port).
"""
from __future__ import annotations

import socket
import threading


class SilentServer:
    def __init__(self, lifetime: float = 120.0):
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closing = threading.Timer(lifetime, self.close)
        self._closing.daemon = True

    @property
    def docker_host(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self):
        threading.Thread(target=self._accept, daemon=True).start()
        self._closing.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._accepted(connection)

    def _accepted(self, connection: socket.socket) -> None:
        self._hold(connection)  # held open, never read from nor written to

    def _hold(self, connection: socket.socket) -> None:
        with self._lock:
            self._held.append(connection)

    def close(self) -> None:
        self._closing.cancel()
        self._listener.close()
        with self._lock:
            held, self._held = self._held, []
        for connection in held:
            connection.close()
