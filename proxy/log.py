"""Logging: one loguru sink on standard output, and everything routed into it.

gunicorn's own lines (through ``GunicornLogger``, named by ``logger_class`` in
gunicorn.conf.py), Flask's, werkzeug's, urllib3's and docker's stdlib logging all end up
in the same sink with the same format: timestamp, level, message.
"""
from __future__ import annotations

import logging
import sys

from gunicorn.glogging import Logger as _GunicornBaseLogger
from loguru import logger

LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {message}"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
    logger.add(sys.stdout, level=level, format=LOG_FORMAT, backtrace=False, diagnose=False)
    logging.basicConfig(handlers=[InterceptHandler()], level=level, force=True)
    # urllib3 logs every new connection at DEBUG: too chatty even for our DEBUG.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, logging.getLevelName(level)))


class GunicornLogger(_GunicornBaseLogger):
    """gunicorn's error and access logs, sent through loguru."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            log.handlers = [InterceptHandler()]
            log.propagate = False
