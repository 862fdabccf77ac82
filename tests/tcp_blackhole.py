"""tcp:// stand-ins for an engine that cannot be reached, all on 127.0.0.1 and each bounded
in time (they close themselves after ``lifetime`` seconds):

- ``SilentServer`` accepts TCP connections and never says a word (a blackholed address,
  or a hung engine's port);
- ``BlackholeRelay`` relays TCP to a real engine's unix socket until ``blackhole()``: from
  then on nothing passes on the open connections, and new ones are accepted and never
  answered, as if the network between proxy and engine dropped every packet. ``heal()``
  lets the open connections flow again and relays new ones; those accepted meanwhile stay
  unanswered for good (lost in the blackhole).
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


class BlackholeRelay(SilentServer):
    def __init__(self, unix_socket: str, lifetime: float = 120.0):
        super().__init__(lifetime)
        self.unix_socket = unix_socket
        self._flowing = threading.Event()
        self._flowing.set()

    def blackhole(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        super().close()
        self._flowing.set()  # the pumps held in the blackhole find their sockets closed and end

    def _accepted(self, connection: socket.socket) -> None:
        if not self._flowing.is_set():
            self._hold(connection)
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.unix_socket)
        except OSError:
            connection.close()
            return
        self._hold(connection)
        self._hold(upstream)
        for source, target in ((connection, upstream), (upstream, connection)):
            threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()  # in the blackhole: held until it heals
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            for end in (source, target):  # one side is gone: so is the link
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
