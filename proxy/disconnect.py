"""Notice a client that leaves while we wait on its backend, and cut the backend off.

Under gunicorn's gevent worker a vanished client is otherwise noticed only at the next
write, which for a long prompt may be minutes away (DESIGN.md §5). A small greenlet per
request waits for the client socket to turn readable; if a peek then finds EOF the client
is gone, and the exchange shuts the upstream socket so the backend stops generating.
"""
from __future__ import annotations

import socket

import gevent
from gevent.socket import wait_read
from loguru import logger

from .upstream import Exchange

_PENDING_BYTES_RECHECK = 0.25  # seconds; bytes waiting (an unread body) are not EOF


def watch_client(environ: dict, exchange: Exchange, label: str):
    """Start watching the client of this request; None when not under gunicorn."""
    client = environ.get("gunicorn.socket")
    if client is None:
        return None
    return gevent.spawn(_watch, client, exchange, label)


def stop_watching(watcher) -> None:
    if watcher is not None:
        watcher.kill(block=False)


def _watch(client, exchange: Exchange, label: str) -> None:
    raw = getattr(client, "_sock", client)  # the real non-blocking socket under gevent's
    fd = client.fileno()
    while not exchange.done:
        wait_read(fd)
        if exchange.done:
            return
        try:
            peeked = raw.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError:
            peeked = b""
        if not peeked:
            logger.info("{}: client went away; closing the upstream connection", label)
            exchange.cut()
            return
        gevent.sleep(_PENDING_BYTES_RECHECK)
