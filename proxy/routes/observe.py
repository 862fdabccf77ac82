"""The admin API's long answers, on the ``/api/v1`` blueprint (so the admin token applies):
``GET /api/v1/events``, the live event feed, and ``GET /api/v1/service/<id>/logs``, a
container's log (followed, if asked, until it stops)."""
from __future__ import annotations

import math
import socket
import time

from flask import Response, request

from ..errors import InvalidRequest, NoContainer
from ..masking import masker
from ..services.feed import encode
from .admin import _flag, _runtime, _service, all_reports, bp
from .leaving import cutter, watch_leaving, worker_stopping

_DEFAULT_TAIL = 200
_MAX_TAIL = 1_000_000
_MAX_SINCE = 10 * 365 * 86400.0  # seconds: ten years back is "everything"


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


@bp.get("/service/<service_id>/logs")
def service_logs(service_id: str):
    """The container's stdout and stderr as Docker gives them, one line per line, with the
    configured secrets masked; ``follow=true``: until the container stops or the client leaves."""
    service = _service(service_id)
    tail, follow, since, timestamps = _log_arguments()
    runtime = _runtime()
    runtime.lifecycle.check_engine(service)
    stream = runtime.containers.logs(service, tail=tail, follow=follow, timestamps=timestamps,
                                     since=None if since is None else time.time() - since)
    if stream is None:
        raise NoContainer(f"Service '{service_id}' has no container", service_id=service_id,
                          hint=f"Start it with POST /api/v1/service/{service_id}/start")
    mask = masker(runtime.config.secrets)
    cut = cutter(request.environ)
    stop_watching = watch_leaving(request.environ, stream.close)  # a silent container: only this sees the client go

    def body():
        for line in stream.lines():
            yield mask(line.decode("utf-8", "replace")).encode() + b"\n"

    response = _streaming(body(), "text/plain")

    @response.call_on_close
    def _done() -> None:
        stop_watching()
        stream.close()  # the engine-side connection, at once
        if worker_stopping():
            cut()

    return response


def _log_arguments() -> tuple[int | str, bool, float | None, bool]:
    text = request.args.get("tail", str(_DEFAULT_TAIL))
    if text == "all":
        tail: int | str = "all"
    elif text.isascii() and text.isdigit() and int(text) <= _MAX_TAIL:
        tail = int(text)
    else:
        raise InvalidRequest(f"Query parameter 'tail' must be 'all' or a number of lines from 0 to {_MAX_TAIL}",
                             code="invalid_parameter")
    since = None
    if "since" in request.args:
        try:
            since = float(request.args["since"])
        except ValueError:
            since = -1.0
        if not (math.isfinite(since) and 0 <= since <= _MAX_SINCE):
            raise InvalidRequest("Query parameter 'since' must be a number of seconds back, from 0 to "
                                 f"{_MAX_SINCE:g}", code="invalid_parameter")
    return tail, _flag("follow", False), since, _flag("timestamps", False)
