"""A backend made of raw sockets, for answers no well-behaved HTTP server gives: a
Content-Length beside chunking, an interim 103 before the answer, or no answer at all.

It listens on 127.0.0.1 in a thread, serves each connection in a thread of its own, answers
every complete request on a connection with the same bytes (when it has some), and records
what each connection received and when it ended. Everything stops at ``close()``, and each
connection gives up after ``idle_timeout`` seconds without a byte.
"""
from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field

_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)\r\n", re.IGNORECASE)


@dataclass
class Connection:
    received: bytearray = field(default_factory=bytearray)
    ended_at: float | None = None  # time.monotonic() when it closed

    def has(self, marker: bytes) -> bool:
        return marker in self.received


class RawBackend:
    def __init__(self, answer: bytes | None = None, idle_timeout: float = 60.0):
        self.answer = answer  # sent once per complete request; None: read, never answer
        self.idle_timeout = idle_timeout
        self.connections: list[Connection] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            record = Connection()
            with self._lock:
                self.connections.append(record)
                self._open.append(sock)
            threading.Thread(target=self._serve, args=(sock, record), daemon=True).start()

    def _serve(self, sock: socket.socket, record: Connection) -> None:
        sock.settimeout(self.idle_timeout)
        pending = b""
        try:
            while data := sock.recv(65536):
                record.received += data
                pending += data
                while self.answer is not None and (request_end := _request_end(pending)) is not None:
                    pending = pending[request_end:]
                    sock.sendall(self.answer)
        except OSError:
            pass
        finally:
            record.ended_at = time.monotonic()
            sock.close()

    def connection_with(self, marker: bytes) -> Connection | None:
        """The connection that received ``marker`` (a test id in a header, say)."""
        with self._lock:
            return next((c for c in self.connections if c.has(marker)), None)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _request_end(data: bytes) -> int | None:
    """Where the first complete request in ``data`` ends (head and Content-Length body)."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    length = _LENGTH.search(data[:head_end + 2])
    end = head_end + 4 + (int(length.group(1)) if length else 0)
    return end if len(data) >= end else None
