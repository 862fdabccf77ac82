"""Logging: one loguru sink on standard output, and everything routed into it.

gunicorn's own lines (through ``GunicornLogger``, named by ``logger_class`` in
gunicorn.conf.py), Flask's, werkzeug's, urllib3's and docker's stdlib logging all end up
in the same sink with the same format: timestamp, level, message.

Two guarantees hold for every line the sink writes:

- each line has the prefix, also the continuation lines of a multi-line message (gunicorn's
  configuration dump at DEBUG, a traceback), so line-based tools never see a bare line;
- query-string values and ``Bearer`` credentials are masked (``?api_key=***``): clients put
  API keys there, and URLs reach the log from many places (our own messages, exception
  texts from requests and urllib3), so the sink is the one place that sees them all.
"""
from __future__ import annotations

import logging
import re
import sys
import time

from flask import Flask, g, request
from gunicorn.glogging import Logger as _GunicornBaseLogger
from loguru import logger

LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {message}"
REDACTED = "***"

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


class _LineSink:
    """Writes each formatted record with its secrets masked and the prefix on every line."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, message) -> None:
        text = redact(str(message).rstrip("\n"))
        if "\n" in text:
            record = message.record
            prefix = f"{record['time']:YYYY-MM-DD HH:mm:ss.SSS} | {record['level'].name: <8} | "
            text = text.replace("\n", "\n" + prefix)
        self._stream.write(text + "\n")
        self._stream.flush()


class InterceptHandler(logging.Handler):
    """Hands stdlib log records to loguru, keeping their level and origin."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(level: str = "INFO") -> None:
    """(Re)configure the single sink; safe to call more than once."""
    logger.remove()
    # enqueue=False: writes stay in the calling greenlet; diagnose=False keeps local
    # variables (which may hold tokens) out of logged tracebacks.
    logger.add(_LineSink(sys.stdout).write, level=level, format=LOG_FORMAT, backtrace=False,
               diagnose=False)
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
