"""Errors the proxy itself produces, and the one JSON envelope they share.

Every error a client sees from the proxy (not from a backend) has the OpenAI shape, so
OpenAI clients display it well, plus ``source: "proxy"`` so nobody mistakes it for the
model's own answer::

    {"error": {"message": "...", "type": "service_unavailable",
               "code": "service_not_running", "service_id": "llama3", "source": "proxy"}}
"""
from __future__ import annotations

import secrets

from flask import Flask, Response, has_request_context, json, request
from loguru import logger
from werkzeug.exceptions import HTTPException

# OpenAI-style error types by status; the code says what exactly went wrong.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


class ProxyError(Exception):
    """Root of the proxy's own errors: catch this to catch them all."""

    status = 500
    code = "internal_error"
    # A 5xx message in the proxy's own words only, fit for any client. Any other 5xx may
    # carry foreign text (Docker's, with host paths and image names): outside the admin API
    # it is answered plainly, with a reference to the log line (see ``answer``).
    plain = False

    def __init__(self, message: str, *, service_id: str | None = None, hint: str | None = None,
                 code: str | None = None, status: int | None = None, extra: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.headers = headers or {}
        self.message = message
        self.service_id = service_id
        self.hint = hint
        self.extra = extra or {}
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict:
        body = {
            "message": self.message,
            "type": ERROR_TYPES.get(self.status, "server_error"),
            "code": self.code,
            "service_id": self.service_id,
            "source": "proxy",
        }
        if self.hint:
            body["hint"] = self.hint
        body.update(self.extra)
        return {"error": body}


class ServiceNotFound(ProxyError):
    status, code = 404, "service_not_found"

    def __init__(self, service_id: str):
        super().__init__(f"Service '{service_id}' is not configured", service_id=service_id)


class ServiceNotRunning(ProxyError):
    status, code, plain = 503, "service_not_running", True

    def __init__(self, service_id: str, state: str = "not running", extra: dict | None = None):
        super().__init__(
            f"Service '{service_id}' is not running" + ("" if state == "not running" else f" (container {state})"),
            service_id=service_id, extra=extra,
            hint=f"Start it with POST /api/v1/service/{service_id}/start",
        )


class NoContainer(ProxyError):
    """404: the service is configured, but it has no container (never started, or stopped and removed)."""

    status, code = 404, "no_container"


class ServiceStopping(ProxyError):
    status, code, plain = 503, "service_stopping", True


class ModelNotFound(ProxyError):
    status, code = 404, "model_not_found"


class InvalidRequest(ProxyError):
    """400 for a request the proxy cannot use; ``code`` says what exactly."""

    status, code = 400, "invalid_request"


class BodyTooLarge(ProxyError):
    status, code = 413, "body_too_large"


class BodyTimeout(ProxyError):
    """The client stopped sending its body; the connection is closed after this answer."""

    status, code = 408, "body_timeout"


class ServerBusy(ProxyError):
    """This worker holds as many request bodies as ``server.max_buffered`` allows."""

    status, code, plain = 503, "server_busy", True


class TooManyRequests(ProxyError):
    status, code = 429, "too_many_requests"


class Unauthorized(ProxyError):
    status, code = 401, "unauthorized"


class HostNotAllowed(ProxyError):
    """400: the Host header names no host of ``server.allowed_hosts`` (DNS rebinding)."""

    status, code = 400, "host_not_allowed"


class OriginNotAllowed(ProxyError):
    """403: a browser page of an origin not in ``server.cors_origins`` (cross-site request)."""

    status, code = 403, "origin_not_allowed"


class UnsupportedMediaType(ProxyError):
    status, code = 415, "unsupported_media_type"


class UpstreamUnreachable(ProxyError):
    status, code, plain = 502, "upstream_unreachable", True


class UpstreamTimeout(ProxyError):
    status, code, plain = 504, "upstream_timeout", True


class DockerUnavailable(ProxyError):
    status, code = 503, "docker_unavailable"


class AlreadyRunning(ProxyError):
    status, code = 409, "already_running"


class NameConflict(ProxyError):
    status, code = 409, "name_conflict"


class StartFailed(ProxyError):
    """A start that did not reach ready; ``code`` is one of START_FAILURES."""

    status, code = 500, "start_failed"


class StartTimeout(ProxyError):
    status, code, plain = 504, "start_timeout", True


class StopFailed(ProxyError):
    status, code = 500, "stop_failed"


# Every code a start can fail with, whichever path asked for it (admin API or a request).
START_FAILURES = {
    "start_failed": (500, "Docker refused the container (port taken, GPU runtime missing, ...)"),
    "image_unavailable": (500, "the image is not present and could not be pulled"),
    "volume_missing": (500, "a bind-mount source does not exist (checked before creating)"),
    "container_exited": (500, "the container exited while starting; see exit_code, oom_killed and logs"),
    "start_timeout": (504, "not ready within the deadline"),
}


ADMIN_ROUTES = "/api/"  # the admin API: its callers see every error in full
_STARTING = frozenset(START_FAILURES) | {"autostart_exited", "autostart_timeout", "docker_unavailable"}


def answer(error: ProxyError, path: str) -> dict:
    """The envelope a caller of ``path`` gets for ``error``; the error is logged here, once.

    On the admin API every error comes in full. Elsewhere (``/v1``, ``/service``) a 5xx that
    is not ``plain`` comes as a plain message with a ``ref``; the log line with the same ref
    holds the full detail, for the operator.
    """
    ref = None
    body = error.to_dict()
    if error.status >= 500 and not error.plain and not path.startswith(ADMIN_ROUTES):
        ref = secrets.token_hex(6)
        if error.service_id and error.code in _STARTING:
            what = f"Service '{error.service_id}' could not be started"
        else:
            what = "The proxy could not complete this request"
        body = {"error": {"message": f"{what}; the proxy's log has the details under ref {ref}",
                          "type": body["error"]["type"], "code": error.code, "service_id": error.service_id,
                          "source": "proxy", "ref": ref}}
    # The message never holds a secret by design, and the log sink masks any that slipped in.
    logger.log("WARNING" if error.status >= 500 else "INFO", "{} {} {}{}: {}", error.status, error.code,
               error.service_id or "-", f" (ref {ref})" if ref else "", error.message)
    return body


def error_response(error: ProxyError) -> Response:
    path = request.path if has_request_context() else ""
    return Response(json.dumps(answer(error, path)), status=error.status, mimetype="application/json",
                    headers=error.headers)


def _http_exception(exc: HTTPException) -> Response:
    # Flask's own 404/405/400... in our envelope; keep headers such as Allow on a 405.
    code = (exc.name or "error").lower().replace(" ", "_")
    response = error_response(ProxyError(exc.description or exc.name, status=exc.code, code=code))
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ProxyError, error_response)
    app.register_error_handler(HTTPException, _http_exception)
