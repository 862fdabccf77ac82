"""The ``/service/<id>/<path>`` blueprint: forward anything to a service's container and
stream the answer back as it comes (the sending and streaming itself is ``relay``'s)."""
from __future__ import annotations

from urllib.parse import unquote

from flask import Blueprint, current_app, request

from ..config import ServiceConfig
from ..errors import InvalidRequest, ProxyError, ServiceNotFound
from ..forwarding.relay import Outgoing, body_too_large, relay
from ..metrics.request_meter import RequestMeter
from ..forwarding.upstream import SizedBody, chunked_body, client_target, request_headers

bp = Blueprint("service", __name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Forwarded as sent, never redirected by werkzeug: not a path with "//" (merge_slashes), nor
# /service/<id> to /service/<id>/ (which rules with `defaults` would do).
_ROUTE = {"methods": METHODS, "provide_automatic_options": False, "merge_slashes": False}
_SMALL_BODY = 64 * 1024


@bp.route("/service/<service_id>", **_ROUTE)
@bp.route("/service/<service_id>/", **_ROUTE)
@bp.route("/service/<service_id>/<path:path>", **_ROUTE)
def forward(service_id: str, path: str = ""):
    runtime = current_app.extensions["proxy"]
    service = runtime.config.services.get(service_id)
    if service is None:
        raise ServiceNotFound(service_id)
    meter = RequestMeter(service_id, "service")
    try:
        environ = request.environ
        trusted = runtime.config.server.is_trusted_proxy(environ.get("REMOTE_ADDR", ""))
        headers = request_headers(environ, service.upstream_host, trusted)
        body = request_body(environ, headers)
        if service.max_body_size is not None:
            body = limit_body(body, service)
        outgoing = Outgoing(request.method, upstream_target(environ, service_id), headers, body)
        return relay(runtime, service, outgoing, environ, meter)
    except ProxyError as error:
        meter.refused(error.status)
        raise


def upstream_target(environ: dict, service_id: str) -> str:
    """The backend's path and query, byte for byte as the client sent them: the client's
    raw target less ``/service/<id>`` (Flask's decoded path would lose the encoding)."""
    path, sep, query = client_target(environ).partition("?")
    segments = path.split("/", 3)  # ["", "service", "<id>", "<rest>"]
    if len(segments) < 3 or unquote(segments[2]) != service_id:
        raise InvalidRequest("The request path could not be mapped to the service", code="invalid_path",
                             service_id=service_id)
    rest = "/" + (segments[3] if len(segments) > 3 else "")
    return rest + sep + query


def request_body(environ: dict, headers: dict):
    """The client's body, streamed: sized when it came with a length, else chunked."""
    length = environ.get("CONTENT_LENGTH")
    if length:
        size = int(length)
        headers["Content-Length"] = length  # adapter: a length means "send it unchunked"
        if size <= _SMALL_BODY:  # a prompt: read whole, it leaves with the headers in one send
            return environ["wsgi.input"].read(size)
        return SizedBody(environ["wsgi.input"], size)  # an upload: streamed
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return chunked_body(environ["wsgi.input"])
    return None


def limit_body(body, service: ServiceConfig):
    """Refuse a body over the service's ``max_body_size``: at once when its length says so,
    else (chunked) when the count goes over while it streams up; raising there makes urllib3
    drop the upstream connection mid-body, and the client still gets the 413."""
    if isinstance(body, (bytes, SizedBody)) and len(body) > service.max_body_size:
        raise body_too_large(service)
    if body is None or isinstance(body, (bytes, SizedBody)):
        return body
    return _counted(body, service)


def _counted(chunks, service: ServiceConfig):
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if sent > service.max_body_size:
            raise body_too_large(service)
        yield chunk
