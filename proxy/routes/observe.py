"""The admin API's long answers, on the ``/api/v1`` blueprint (so the admin token applies):
``GET /api/v1/events``, the live event feed."""
from __future__ import annotations

import socket

from flask import Response, request

from ..services.feed import encode
from .admin import _runtime, all_reports, bp
from .leaving import cutter, watch_leaving


# A subscriber's share of kernel memory: the feed sends little, and a client that stops
# reading is found (its queue fills) after this much rather than after megabytes.
_FEED_SEND_BUFFER = 16 * 1024


def _streaming(body, mimetype: str) -> Response:
    response = Response(body, mimetype=mimetype)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # so an nginx in front passes each line on at once
    return response


@bp.get("/events")
def events():
    """A snapshot of every service, then one event per change (Server-Sent Events)."""
    runtime = _runtime()
    feed = runtime.feed
    cut = cutter(request.environ)
    client = request.environ.get("gunicorn.socket")
    if client is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _FEED_SEND_BUFFER)
    subscription = feed.subscribe(on_drop=cut)
    try:
        reports = all_reports(runtime)
    except BaseException:
        feed.unsubscribe(subscription)
        raise
    subscription.remember(reports)
    stop_watching = watch_leaving(request.environ, lambda: feed.unsubscribe(subscription))

    def body():
        yield encode("snapshot", {"services": reports})
        yield from subscription.events()

    response = _streaming(body(), "text/event-stream")

    @response.call_on_close
    def _done() -> None:  # the answer has ended (its last chunk is out) or broke off
        stop_watching()
        feed.unsubscribe(subscription)
        cut()  # a feed ends only when it must: its client left, stopped reading, or the worker stops

    return response
