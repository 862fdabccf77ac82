"""The client's request body as the proxy takes it in, whichever route reads it.

- A deadline: each read of ``wsgi.input`` waits at most ``server.body_timeout`` for the
  client's next bytes. gunicorn's gevent worker reads a body straight from the client's
  socket with no timeout (its keep-alive timer covers the request head only), so a client
  that sent part of a body and stopped held its connection, and the upstream one behind it,
  forever. Past the deadline the read raises ``BodyTimeout`` (408). gunicorn then closes the
  connection (a body read that failed leaves it unusable), and a body that was streaming
  upstream loses that connection too (urllib3 closes a connection that raised mid-request).
- A ``Content-Length`` that no buffer could hold (2^63 and more) is 413 on every route,
  before anything sizes a read with it.
- ``BufferBudget``: the bytes of bodies a worker holds whole (the front door reads its JSON
  whole), against ``server.max_buffered``.
"""
from __future__ import annotations

import sys

from flask import Flask, request

from ..config import ServerConfig
from ..errors import BodyTimeout, BodyTooLarge, ServerBusy

_LARGEST_LENGTH = sys.maxsize  # 2^63 - 1: what a read size or len() can take


class DeadlineInput:
    """``wsgi.input`` whose every read gives up after ``timeout`` seconds without a byte."""

    __slots__ = ("_stream", "_sock", "_timeout")

    def __init__(self, stream, sock, timeout: float):
        self._stream = stream
        self._sock = sock  # gunicorn reads the body from this very socket
        self._timeout = timeout

    def read(self, size: int | None = -1) -> bytes:
        return self._under_deadline(self._stream.read, size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._under_deadline(self._stream.readline, size)

    def __iter__(self):
        while line := self.readline():
            yield line

    def _under_deadline(self, read, size) -> bytes:
        sock = self._sock
        previous = sock.gettimeout()
        sock.settimeout(self._timeout)  # gevent: a plain attribute, no system call
        try:
            return read(size)
        except TimeoutError:
            raise BodyTimeout(f"No byte of the request body came within {self._timeout:g} s",
                              hint="server.body_timeout sets the limit") from None
        finally:
            sock.settimeout(previous)


def register_body_guard(app: Flask, server: ServerConfig) -> None:
    """Check every request's Content-Length, and put its body under the deadline."""
    timeout = server.body_timeout

    @app.before_request
    def guard_body() -> None:
        environ = request.environ
        length = environ.get("CONTENT_LENGTH")  # gunicorn let only digits through
        if length and (len(length) > 19 or int(length) > _LARGEST_LENGTH):
            raise BodyTooLarge(f"Content-Length {length[:40]} is beyond any body the proxy takes")
        sock = environ.get("gunicorn.socket")
        if sock is not None and (length or "HTTP_TRANSFER_ENCODING" in environ):
            environ["wsgi.input"] = DeadlineInput(environ["wsgi.input"], sock, timeout)


class BufferBudget:
    """The bytes of request bodies this worker holds whole, within ``server.max_buffered``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def hold(self) -> "HeldBody":
        return HeldBody(self)

    def _take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise ServerBusy("The proxy holds as many request bodies as it may at once; retry shortly",
                             hint="server.max_buffered sets the limit", headers={"Retry-After": "1"})
        self.held += size


class HeldBody:
    """One request's share of the budget: grows as its body is read, given back once."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: BufferBudget):
        self._budget = budget
        self.size = 0

    def add(self, size: int) -> None:
        """Count ``size`` more bytes; ServerBusy (503) when the worker's budget has no room."""
        self._budget._take(size)
        self.size += size

    def release(self) -> None:
        self._budget.held -= self.size
        self.size = 0
