"""The end of the admin API's long answers (the event feed, followed logs): a client that
leaves, or the worker stopping.

A client that leaves while nothing is written to it would otherwise hold its subscription,
or the Docker log stream, until the next write fails. A libev io watcher on its socket
calls back (in the hub, no greenlet per client) when it turns readable; a peek tells what
came. End of file or an error: the client left (these answers are read by EventSource,
curl and the like, which never half-close their sending side). Bytes: a pipelined request,
so the watch ends there and the next write tells instead.

A worker told to stop (SIGTERM: a stop or a reload of the proxy) waits for its requests to
finish, up to the graceful timeout. These answers never finish by themselves, so they are
ended then as if their clients had left: each answer ends cleanly, its connection is
closed rather than kept alive, and an EventSource reconnects (to a new worker, after a
reload).
"""
from __future__ import annotations

import signal
import socket
from typing import Callable

import gevent
from gevent import get_hub

_STOP_CHECK_EVERY = 0.5  # seconds between looks at the stop flag while long answers run


class _Watch:
    __slots__ = ("raw", "io", "on_gone")

    def __init__(self, client, on_gone: Callable[[], None]):
        self.raw = getattr(client, "_sock", client)  # the real non-blocking socket under gevent's
        self.on_gone = on_gone
        self.io = get_hub().loop.io(client.fileno(), 1)  # 1: READ
        self.io.start(self._readable)

    def _readable(self) -> None:
        try:
            peeked = self.raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            peeked = b""  # reset: gone
        if peeked:
            self._stop_io()  # a pipelined request: the next write tells
        else:
            self.end()

    def end(self) -> None:
        """The answer is over: call on_gone, out of the hub (what it closes may switch greenlets)."""
        self.stop()
        gevent.spawn(self.on_gone)

    def stop(self) -> None:
        self._stop_io()
        _watches.pop(self, None)

    def _stop_io(self) -> None:
        if self.io is not None:
            self.io.stop()
            self.io.close()
            self.io = None


_watches: dict[_Watch, None] = {}  # the long answers running in this worker
_stop_signalled = False
_hooked = False
_checker: gevent.Greenlet | None = None


def watch_leaving(environ: dict, on_gone: Callable[[], None]) -> Callable[[], None]:
    """Call ``on_gone`` (in a new greenlet) once the client of this request leaves or the
    worker is told to stop; returns the function that ends the watch. Outside gunicorn,
    nothing is watched."""
    global _checker
    client = environ.get("gunicorn.socket")
    if client is None:
        return lambda: None
    _hook_stop_signal()
    watch = _Watch(client, on_gone)
    _watches[watch] = None
    if _checker is None:
        _checker = gevent.spawn(_end_all_when_stopping)
    return watch.stop


def worker_stopping() -> bool:
    """Whether this worker was told to stop (its keep-alive connections should then close)."""
    return _stop_signalled


def cutter(environ: dict) -> Callable[[], None]:
    """A function that cuts the client's connection, waking a write stuck on it."""
    client = environ.get("gunicorn.socket")

    def cut() -> None:
        if client is not None:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
    return cut


def _end_all_when_stopping() -> None:
    global _checker
    try:
        while _watches:
            if _stop_signalled:
                for watch in list(_watches):
                    watch.end()
            gevent.sleep(_STOP_CHECK_EVERY)
    finally:
        _checker = None


def _hook_stop_signal() -> None:
    """Chain a flag onto the gunicorn worker's SIGTERM handler (which only marks the worker
    as stopping); anything else's handler is left alone."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    previous = signal.getsignal(signal.SIGTERM)
    from gunicorn.workers.base import Worker
    if not isinstance(getattr(previous, "__self__", None), Worker):
        return

    def stopping(signum, frame) -> None:
        global _stop_signalled
        _stop_signalled = True  # a flag only: this runs between any two bytecodes
        previous(signum, frame)

    try:
        signal.signal(signal.SIGTERM, stopping)
    except ValueError:  # not the main thread: not a gunicorn worker's greenlet
        pass
