"""Reading the proxy's event feed (``GET /api/v1/events``) in a test, and telling which
gunicorn worker holds a connection (from /proc: which worker has the accepted socket)."""
from __future__ import annotations

import http.client
import json
import os
import threading
import time

from conftest import wait_until


class FeedReader:
    """One subscriber, read by a thread: every event with the time.time() it arrived."""

    def __init__(self, proxy, connection: http.client.HTTPConnection | None = None, headers: dict | None = None):
        self.connection = connection or connect(proxy)
        self.connection.request("GET", "/api/v1/events", headers=headers or {})
        self.response = self.connection.getresponse()
        self.events: list[tuple[float, str, dict]] = []
        self.comments: list[tuple[float, bytes]] = []
        self.ended: str | None = None  # "clean" once the answer ended properly, else the error
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        kind, data = None, []
        try:
            while True:
                line = self.response.readline()
                if not line:
                    break
                line = line.rstrip(b"\r\n")
                if not line:
                    if data:
                        self.events.append((time.time(), kind or "message", json.loads(b"\n".join(data))))
                    kind, data = None, []
                elif line.startswith(b":"):
                    self.comments.append((time.time(), line))
                elif line.startswith(b"event:"):
                    kind = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    data.append(line[5:].strip())
            self.ended = "clean"
        except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:  # AttributeError: closed here
            self.ended = repr(exc)

    @property
    def snapshot(self) -> dict:
        found = wait_until(lambda: [data for _, kind, data in self.events if kind == "snapshot"], timeout=10,
                           what="the snapshot")
        return found[0]

    def of(self, service_id: str) -> list[tuple[float, dict]]:
        """The service events of one service, in order."""
        return [(at, data) for at, kind, data in list(self.events)
                if kind == "service" and data["service_id"] == service_id]

    def states(self, service_id: str) -> list[str]:
        return [data["state"] for _, data in self.of(service_id)]

    def wait_for(self, service_id: str, state: str, timeout: float = 30, after: int = 0) -> tuple[float, dict]:
        """The first event of the service in ``state`` (among its events from index ``after``)."""
        def found():
            return next(((at, data) for at, data in self.of(service_id)[after:] if data["state"] == state), None)
        return wait_until(found, timeout=timeout, what=f"an event: {service_id} {state}")

    def close(self) -> None:
        self.connection.close()


def connect(proxy) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    connection.connect()
    return connection


def worker_pids(proxy) -> list[int]:
    """The gunicorn workers of a proxy: the master's children."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proxy.proc.pid:
                found.append(int(entry))
    return sorted(found)


def worker_of(proxy, connection: http.client.HTTPConnection, timeout: float = 5.0) -> int:
    """The worker that accepted this connection."""
    client_port = connection.sock.getsockname()[1]

    def inode() -> str | None:
        with open("/proc/net/tcp") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if int(local.split(":")[1], 16) == proxy.port and int(remote.split(":")[1], 16) == client_port:
                    return fields[9]
        return None

    def owner() -> int | None:
        wanted = f"socket:[{inode()}]"
        for pid in worker_pids(proxy):
            try:
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except OSError:
                continue
            if wanted in links:
                return pid
        return None

    return wait_until(owner, timeout=timeout, what="the worker that accepted the connection")


def connection_to_another_worker(proxy, pid: int, tries: int = 200) -> http.client.HTTPConnection:
    """A fresh connection that a worker other than ``pid`` accepted."""
    for _ in range(tries):
        connection = connect(proxy)
        if worker_of(proxy, connection) != pid:
            return connection
        connection.close()
    raise AssertionError(f"every connection landed on worker {pid}")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
