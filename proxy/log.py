"""Logging: one loguru sink on standard output, and everything routed into it.

gunicorn's own lines (through ``GunicornLogger``, named by ``logger_class`` in
gunicorn.conf.py), Flask's, werkzeug's, urllib3's and docker's stdlib logging all end up
in the same sink with the same format: timestamp, level, message.

The sink is the one place every line passes, so these guarantees are kept there:

- one record is one line: non-printable characters in a message (newlines, escape
  sequences, NUL) are written escaped (``\n``, ``\x1b``), so text a client controls (a
  path, a service id, a model name, gunicorn's quote of a bad request) cannot forge lines
  or drive a terminal. Only a traceback spans lines, each with the prefix;
- the configured secrets (``Config.secrets``: the admin token, the API keys, what ``${VAR}``
  brought in from the environment) are masked wherever they appear, also in text that
  quotes a client's request;
- query-string values and ``Bearer`` credentials are masked (``?api_key=***``): clients put
  API keys there, and URLs reach the log from many places (our own messages, exception
  texts from requests and urllib3).
"""
from __future__ import annotations

import logging
import re
import sys
import time

from flask import Flask, g, request
from gunicorn.glogging import Logger as _GunicornBaseLogger
from loguru import logger

from .masking import REDACTED, secrets_pattern

LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {message}"

# A query string: from "?" to the end of the URL (whitespace, quote, bracket or fragment).
_QUERY = re.compile(r"\?[^\s#'\"<>()\[\]]+")
_QUERY_VALUE = re.compile(r"=[^&;]*")  # "=value" up to the next parameter, "=" inside included
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s,;'\"]+")


def redact(text: str) -> str:
    """Mask every query-string value and Bearer credential in a log text."""
    if "?" in text:
        text = _QUERY.sub(lambda match: _QUERY_VALUE.sub("=" + REDACTED, match.group(0)), text)
    if "earer" in text:
        text = _BEARER.sub(r"\1 " + REDACTED, text)
    return text


def printable(text: str) -> str:
    """The text with every non-printable character escaped as Python would write it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class _LineSink:
    """Writes each formatted record as one line (a traceback: a prefixed line each), with its
    non-printable characters escaped and its secrets masked."""

    def __init__(self):
        self.stream = sys.stdout
        self.secrets: re.Pattern | None = None

    def write(self, message) -> None:
        record = message.record
        text = str(message)
        prefix = f"{record['time']:YYYY-MM-DD HH:mm:ss.SSS} | {record['level'].name: <8} | "
        said = record["message"]
        if text.startswith(prefix) and text.startswith(said, len(prefix)):  # LOG_FORMAT: "\n" + any traceback
            traceback = text[len(prefix) + len(said):].rstrip("\n")
        else:
            prefix, said, traceback = "", text.rstrip("\n"), ""
        line = prefix + printable(self._mask(said))
        if traceback:  # the one multi-line part; it may quote a client too
            lines = (printable(part) for part in self._mask(traceback).split("\n"))
            line += ("\n" + prefix).join(lines)
        self.stream.write(redact(line) + "\n")
        self.stream.flush()

    def _mask(self, text: str) -> str:
        return text if self.secrets is None else self.secrets.sub(REDACTED, text)


_sink = _LineSink()


def set_secrets(values) -> None:
    """Mask these values (Config.secrets) in every line from now on."""
    _sink.secrets = secrets_pattern(values)


class InterceptHandler(logging.Handler):
    """Hands stdlib log records to loguru, keeping their level and origin."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(level: str = "INFO", secrets=()) -> None:
    """(Re)configure the single sink, masking ``secrets``; safe to call more than once."""
    logger.remove()
    _sink.stream = sys.stdout
    set_secrets(secrets)
    # enqueue=False: writes stay in the calling greenlet; diagnose=False keeps local
    # variables (which may hold tokens) out of logged tracebacks.
    logger.add(_sink.write, level=level, format=LOG_FORMAT, backtrace=False, diagnose=False)
    logging.basicConfig(handlers=[InterceptHandler()], level=level, force=True)
    # urllib3 logs every new connection at DEBUG, docker-py each config lookup: too chatty.
    for chatty in ("urllib3", "docker"):
        logging.getLogger(chatty).setLevel(max(logging.INFO, logging.getLevelName(level)))


class GunicornLogger(_GunicornBaseLogger):
    """gunicorn's error and access logs, sent through loguru."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            log.handlers = [InterceptHandler()]
            log.propagate = False


def register_request_log(app: Flask) -> None:
    """A DEBUG line per request: method, path, status, time to the response headers.
    Registered only at DEBUG, so the hot path pays nothing otherwise. No query string:
    clients put API keys there."""
    @app.before_request
    def _stamp() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _log(response):
        started = g.get("request_started")
        elapsed_ms = (time.perf_counter() - started) * 1000 if started else 0.0
        logger.debug("{} {} -> {} in {:.1f} ms", request.method, request.path, response.status_code, elapsed_ms)
        return response
