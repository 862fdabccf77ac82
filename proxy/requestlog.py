"""DEBUG log line per request: method, path, status, time to the response headers.

Registered only at DEBUG, so the hot path pays nothing for it otherwise. The query string
is left out on purpose: clients put API keys there.
"""
from __future__ import annotations

import time

from flask import Flask, g, request
from loguru import logger


def register_request_log(app: Flask) -> None:
    @app.before_request
    def _stamp() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _log(response):
        started = g.get("request_started")
        elapsed_ms = (time.perf_counter() - started) * 1000 if started else 0.0
        logger.debug("{} {} -> {} in {:.1f} ms", request.method, request.path, response.status_code, elapsed_ms)
        return response
