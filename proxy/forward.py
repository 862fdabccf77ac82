"""The ``/service/<id>/<path>`` blueprint: forward anything to a service's container and
stream the answer back as it comes."""
from __future__ import annotations

import errno
from urllib.parse import unquote, urlsplit

import requests
import urllib3.exceptions
from flask import Blueprint, Response, current_app, request
from gunicorn.http.errors import ParseException as MalformedBody
from loguru import logger

from .config import ServiceConfig
from .disconnect import stop_watching, watch_client
from .errors import ProxyError, ServiceNotFound, ServiceNotRunning, UpstreamTimeout, UpstreamUnreachable
from .upstream import Exchange, SizedBody, chunked_body, iter_body, request_headers, response_headers

bp = Blueprint("forward", __name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Forwarded as sent, never redirected by werkzeug: not a path with "//" (merge_slashes), nor
# /service/<id> to /service/<id>/ (which rules with `defaults` would do).
_ROUTE = {"methods": METHODS, "provide_automatic_options": False, "merge_slashes": False}


@bp.route("/service/<service_id>", **_ROUTE)
@bp.route("/service/<service_id>/", **_ROUTE)
@bp.route("/service/<service_id>/<path:path>", **_ROUTE)
def forward(service_id: str, path: str = ""):
    runtime = current_app.extensions["proxy"]
    service = runtime.config.services.get(service_id)
    if service is None:
        raise ServiceNotFound(service_id)
    state = runtime.states.state(service_id)
    if not state.forwardable:
        raise ServiceNotRunning(service_id, state.status)

    environ = request.environ
    upstream_host = f"127.0.0.1:{service.port}"
    target = upstream_target(environ, service_id)
    url = f"http://{upstream_host}{target}"
    headers = request_headers(environ, upstream_host)
    body = request_body(environ, headers)
    if service.max_body_size is not None:
        body = limit_body(body, service)
    label = f"{request.method} {service_id}"
    logger.debug("forward {} -> http://{}{}", label, upstream_host, target.partition("?")[0])  # no query: keys

    exchange = Exchange()
    watcher = watch_client(environ, exchange, label)
    try:
        upstream = runtime.upstream.send(request.method, url, headers, body,
                                         (service.timeouts.connect, service.timeouts.read), exchange)
    except (requests.RequestException, OSError, BodyTooLarge) as exc:
        exchange.done = True
        stop_watching(watcher)
        if exchange.client_gone:
            return Response(status=499)  # nobody is listening; nginx's code for it in the logs
        if isinstance(exc, BodyTooLarge):
            raise  # a chunked upload went over the limit: the upstream connection was dropped
        raise _upstream_error(service_id, upstream_host, exc) from None
    except MalformedBody as exc:  # gunicorn's reader of a chunked body met bytes that are not chunks
        exchange.done = True
        stop_watching(watcher)
        raise ProxyError(f"The request body is malformed: {exc}", status=400, code="invalid_body",
                         service_id=service_id) from None

    headers_out = response_headers(upstream.raw.headers.items(), upstream.headers.get("Connection"))
    response = Response(_relay(upstream, exchange, label), status=f"{upstream.status_code} {upstream.reason}",
                        headers=headers_out, direct_passthrough=True)
    # Cleanup on close, not in the generator: a HEAD answer is never iterated.
    response.call_on_close(lambda: _finish(upstream, exchange, watcher))
    if "Content-Type" not in upstream.headers:
        del response.headers["Content-Type"]  # werkzeug would add text/html otherwise
    elif upstream.headers["Content-Type"].startswith("text/event-stream"):
        response.headers["X-Accel-Buffering"] = "no"  # so an nginx in front does not buffer
    return response


def upstream_target(environ: dict, service_id: str) -> str:
    """The backend's path and query, byte for byte as the client sent them.

    Flask hands the view a decoded path (``%2F`` becomes ``/``); the raw request target
    keeps the client's encoding, so it is cut from that instead.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:  # a WSGI server that keeps no raw target: rebuild from the decoded one
        query = environ.get("QUERY_STRING")
        raw = environ.get("PATH_INFO", "") + (f"?{query}" if query else "")
    if not raw.startswith("/"):  # absolute-form target: http://host/service/...
        parts = urlsplit(raw)
        raw = parts.path + (f"?{parts.query}" if parts.query else "")
    path, sep, query = raw.partition("?")
    segments = path.split("/", 3)  # ["", "service", "<id>", "<rest>"]
    if len(segments) < 3 or unquote(segments[2]) != service_id:
        raise ProxyError("The request path could not be mapped to the service", status=400,
                         code="invalid_path", service_id=service_id)
    rest = "/" + (segments[3] if len(segments) > 3 else "")
    return rest + sep + query


def request_body(environ: dict, headers: dict):
    """The client's body, streamed: sized when it came with a length, else chunked."""
    length = environ.get("CONTENT_LENGTH")
    if length:
        size = int(length)
        headers["Content-Length"] = length  # adapter: a length means "send it unchunked"
        return SizedBody(environ["wsgi.input"], size) if size else b""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return chunked_body(environ["wsgi.input"])
    return None


class BodyTooLarge(ProxyError):
    status, code = 413, "body_too_large"

    def __init__(self, service: ServiceConfig):
        super().__init__(f"Request body is larger than the {service.max_body_size} bytes service "
                         f"'{service.id}' accepts", service_id=service.id,
                         hint=f"services.{service.id}.max_body_size sets the limit")


def limit_body(body, service: ServiceConfig):
    """Refuse a body over the service's ``max_body_size``: at once when its length says so,
    else (chunked) when the count goes over while it streams up; raising there makes urllib3
    drop the upstream connection mid-body, and the client still gets the 413."""
    if isinstance(body, SizedBody) and len(body) > service.max_body_size:
        raise BodyTooLarge(service)
    if body is None or isinstance(body, (bytes, SizedBody)):
        return body
    return _counted(body, service)


def _counted(chunks, service: ServiceConfig):
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if sent > service.max_body_size:
            raise BodyTooLarge(service)
        yield chunk


def _upstream_error(service_id: str, upstream_host: str, exc: Exception) -> ProxyError:
    if isinstance(exc, requests.ReadTimeout):
        return UpstreamTimeout(f"Service '{service_id}' sent no response headers within its read timeout",
                               service_id=service_id, hint="Raise timeouts.read for slow prompts")
    logger.warning("service {} at {} did not answer: {}", service_id, upstream_host, exc)
    return UpstreamUnreachable(f"Service '{service_id}' did not answer at {upstream_host}",
                               service_id=service_id,
                               hint="The container runs but its server refused or dropped the connection; "
                                    "it may still be loading or may have crashed")


def _relay(upstream: requests.Response, exchange: Exchange, label: str):
    """Hand each chunk on as it arrives.

    If the backend breaks off, end the client's connection without a clean end (no final
    chunk) so the client sees an incomplete response: raising ECONNRESET makes gunicorn
    close the socket quietly.
    """
    raw = upstream.raw
    try:
        for chunk in iter_body(upstream):
            if raw.connection is None:
                # Read to the end: the connection is back in the pool, maybe already
                # serving another request, so a client leaving now must not cut it.
                exchange.done = True
            yield chunk
        exchange.done = True
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if exchange.client_gone:
            return
        logger.warning("{}: backend broke off mid-response: {}", label, exc)
        raise ConnectionResetError(errno.ECONNRESET, "backend broke off mid-response") from None


def _finish(upstream: requests.Response, exchange: Exchange, watcher) -> None:
    """Runs when the WSGI server closes the response, whatever happened: the connection
    goes back to the pool when the body was read to its end, else it is closed."""
    exchange.done = True
    exchange.connection = None
    stop_watching(watcher)
    upstream.close()
