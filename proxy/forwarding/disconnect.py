"""Notice a client that leaves while we wait on its backend, and cut the backend off.

Under gunicorn's gevent worker a vanished client is otherwise noticed only at the next
write, which for a long prompt may be minutes away. Per request, a libev
io watcher on the client socket calls back (in the hub, no greenlet) when it turns
readable; if a peek then finds EOF the client is gone, and the exchange shuts the
upstream socket so the backend stops generating.
"""
from __future__ import annotations

import socket

from gevent import get_hub
from loguru import logger

from .upstream import Exchange

_PENDING_BYTES_RECHECK = 0.25  # seconds; bytes waiting (an unread body) are not EOF


class _Watch:
    __slots__ = ("raw", "exchange", "label", "loop", "io", "timer")

    def __init__(self, client, exchange: Exchange, label: str):
        self.raw = getattr(client, "_sock", client)  # the real non-blocking socket under gevent's
        self.exchange = exchange
        self.label = label
        self.loop = get_hub().loop
        self.timer = None
        self.io = self.loop.io(client.fileno(), 1)  # 1: READ
        self.io.start(self._readable)

    def _readable(self) -> None:
        if self.exchange.done:
            self.stop()
            return
        try:
            peeked = self.raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            peeked = b""
        if not peeked:
            logger.info("{}: client went away; closing the upstream connection", self.label)
            self.stop()
            self.exchange.cut()
            return
        if self.timer is not None:
            return
        self.io.stop()  # bytes waiting are not EOF: look again later instead of spinning
        self.timer = self.loop.timer(_PENDING_BYTES_RECHECK)
        self.timer.start(self._resume)

    def _resume(self) -> None:
        self.timer.close()
        self.timer = None
        if not self.exchange.done and self.io is not None:
            self.io.start(self._readable)

    def stop(self) -> None:
        if self.io is None:
            return
        self.io.stop()
        self.io.close()
        self.io = None
        if self.timer is not None:
            self.timer.close()
            self.timer = None


def watch_client(environ: dict, exchange: Exchange, label: str):
    """Start watching the client of this request; None when not under gunicorn."""
    client = environ.get("gunicorn.socket")
    if client is None:
        return None
    return _Watch(client, exchange, label)


def stop_watching(watcher) -> None:
    if watcher is not None:
        watcher.stop()
