"""Errors the proxy itself produces, and the one JSON envelope they share.

Every error a client sees from the proxy (not from a backend) has the OpenAI shape, so
OpenAI clients display it well, plus ``source: "proxy"`` so nobody mistakes it for the
model's own answer::

    {"error": {"message": "...", "type": "service_unavailable",
               "code": "service_not_running", "service_id": "llama3", "source": "proxy"}}
"""
from __future__ import annotations

from flask import Flask, Response, json
from loguru import logger
from werkzeug.exceptions import HTTPException

# OpenAI-style error types by status; the code says what exactly went wrong.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
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
    status, code = 503, "service_not_running"

    def __init__(self, service_id: str, state: str = "not running", extra: dict | None = None):
        super().__init__(
            f"Service '{service_id}' is not running" + ("" if state == "not running" else f" (container {state})"),
            service_id=service_id, extra=extra,
            hint=f"Start it with POST /api/v1/service/{service_id}/start",
        )


class ServiceStopping(ProxyError):
    status, code = 503, "service_stopping"


class ModelNotFound(ProxyError):
    status, code = 404, "model_not_found"


class InvalidRequest(ProxyError):
    """400 for a request the proxy cannot use; ``code`` says what exactly."""

    status, code = 400, "invalid_request"


class BodyTooLarge(ProxyError):
    status, code = 413, "body_too_large"


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
    status, code = 502, "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status, code = 504, "upstream_timeout"


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
    status, code = 504, "start_timeout"


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


def error_response(error: ProxyError) -> Response:
    # Every refusal and failure is logged once, here; the message never holds secrets.
    logger.log("WARNING" if error.status >= 500 else "INFO", "{} {} {}: {}", error.status, error.code,
               error.service_id or "-", error.message)
    return Response(json.dumps(error.to_dict()), status=error.status, mimetype="application/json",
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
