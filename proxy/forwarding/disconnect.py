"""Notice a client that leaves while we wait on its backend, and cut the backend off.

Under gunicorn's gevent worker a vanished client is otherwise noticed only at the next
write, which for a long prompt may be minutes away. Per request, a libev io watcher on the
client socket calls back (in the hub, no greenlet) when it turns readable; a peek then
tells what came: an error (a reset) means the client is gone, and the exchange shuts the
upstream socket so the backend stops generating.

End of file is not enough: a client that only shut its sending side (``shutdown(SHUT_WR)``)
looks the same as one that closed, and it still waits for the answer. Only a write tells
them apart, since a closed socket answers data with a reset. So on end of file, while the
answer has not begun, the watcher sends an interim ``100 Continue`` (every HTTP/1.1 client
takes one, RFC 9110 §15.2), then looks a few times a second whether the connection was
reset (the socket then hangs up: POLLHUP). Once the answer is being written, or for an
HTTP/1.0 client (which may get no 1xx), the writes of the answer itself are the test.
"""
from __future__ import annotations

import select
import socket

from gevent import get_hub
from gevent.monkey import get_original
from loguru import logger

from .upstream import Exchange

_PENDING_BYTES_RECHECK = 0.25  # seconds; bytes waiting (an unread body) are not EOF
_RESET_FIRST_LOOK = 0.05  # seconds after end of file (and the probe) to look for a reset
_RESET_LOOK_EVERY = 0.25  # then this often, until the exchange ends
_PROBE = b"HTTP/1.1 100 Continue\r\n\r\n"
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_poll = get_original("select", "poll")  # a look that never yields: this runs in the hub


class _Watch:
    __slots__ = ("raw", "exchange", "label", "loop", "io", "timer", "may_probe")

    def __init__(self, client, exchange: Exchange, label: str, may_probe: bool):
        self.raw = getattr(client, "_sock", client)  # the real non-blocking socket under gevent's
        self.exchange = exchange
        self.label = label
        self.may_probe = may_probe  # an HTTP/1.1 client: it takes an interim answer (1.0 may not)
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
        except OSError:  # reset: gone
            self._gone()
            return
        if peeked:
            if self.timer is not None:
                return
            self.io.stop()  # bytes waiting are not EOF: look again later instead of spinning
            self.timer = self.loop.timer(_PENDING_BYTES_RECHECK)
            self.timer.start(self._resume)
            return
        self._sent_everything()

    def _resume(self) -> None:
        self.timer.close()
        self.timer = None
        if not self.exchange.done and self.io is not None:
            self.io.start(self._readable)

    def _sent_everything(self) -> None:
        """End of file: a half-close or a close. Probe with a write if we may, then watch for
        the reset a closed socket answers with (EOF stays readable: no more io events)."""
        self.io.stop()
        if self.may_probe and not self.exchange.responding:
            try:
                self.raw.send(_PROBE, _SEND_FLAGS)  # the send buffer is empty: all or nothing
            except OSError:
                self._gone()
                return
        self.timer = self.loop.timer(_RESET_FIRST_LOOK, _RESET_LOOK_EVERY)
        self.timer.start(self._look_for_reset)

    def _look_for_reset(self) -> None:
        if self.exchange.done:
            self.stop()
            return
        poller = _poll()
        poller.register(self.raw.fileno(), select.POLLIN)
        events = poller.poll(0)
        if events and events[0][1] & (select.POLLHUP | select.POLLERR):
            self._gone()

    def _gone(self) -> None:
        logger.info("{}: client went away; closing the upstream connection", self.label)
        self.stop()
        self.exchange.cut()

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
    return _Watch(client, exchange, label, may_probe=environ.get("SERVER_PROTOCOL") == "HTTP/1.1")


def stop_watching(watcher) -> None:
    if watcher is not None:
        watcher.stop()
