"""The admin API's OpenAPI 3 document, served at ``GET /api/v1/openapi.json``.

Written by hand as a plain dict (no runtime dependency) and kept next to what the routes
really answer: ``admin.py`` for the bodies, ``proxy/errors.py`` for every error status and
its ``error.code`` (a start's failures are listed from there). Each error response
lists the exact codes it can carry, so a test that validates real answers against this
document (tests/test_openapi.py, with schemathesis) notices a route, status or code that
drifted from it.

The forwarding routes (``/service/<id>/<path>``) are not described: they answer whatever
the backend answers.
"""
from __future__ import annotations

from typing import Iterable

from .. import __version__
from ..config import SERVICE_ID
from ..errors import ERROR_TYPES, START_FAILURES
from ..services.states import REASONS, STATES

_SERVICE_ID_PATTERN = f"^{SERVICE_ID.pattern}$"  # the config's rule for service ids


def _nullable(schema: dict, description: str) -> dict:
    return {**schema, "nullable": True, "description": description}


PULL_PROGRESS = {
    "type": "object",
    "description": "How far an image pull has come (layers and bytes as Docker reports them).",
    "required": ["layers_done", "layers_total", "bytes_done", "bytes_total", "percent"],
    "properties": {
        "layers_done": {"type": "integer", "minimum": 0, "description": "Layers downloaded and extracted, "
                                                                         "or already present."},
        "layers_total": {"type": "integer", "minimum": 0, "description": "Layers the image has (known once "
                                                                          "its manifest was read)."},
        "bytes_done": {"type": "integer", "minimum": 0, "description": "Bytes of the layers downloaded."},
        "bytes_total": {"type": "integer", "minimum": 0, "description": "Bytes of the layers whose size is "
                                                                         "known so far."},
        "percent": _nullable({"type": "number", "minimum": 0, "maximum": 100},
                             "bytes_done of bytes_total; null until a total is known."),
    },
}

CONTAINER_STATUS = {
    "type": "object",
    "description": "One service's lifecycle state, and what Docker says about its container.",
    "required": ["service_id", "state", "reason", "status", "ready", "container_id", "image", "started_at",
                 "exit_code", "oom_killed", "progress", "port", "stale", "in_flight", "queued", "engine",
                 "aliases", "group", "exclusive", "gpus", "autostart", "idle_timeout", "idle_seconds_left"],
    "properties": {
        "service_id": {"type": "string"},
        "state": {"type": "string", "enum": list(STATES),
                  "description": "The lifecycle state, the same from every worker: stopped, pulling (its image "
                                 "is being pulled before the container is made), starting (being created, or "
                                 "running but health_path not yet 200), ready, stopping (draining or "
                                 "stopping), failed (the last start failed, or the container exited without "
                                 "being asked to)."},
        "reason": _nullable({"type": "string", "enum": list(REASONS)}, "Why it is failed; null otherwise."),
        "status": {"type": "string",
                   "description": "Docker's status (running, exited, created, restarting, paused, removing, "
                                  "dead), 'not found' when there is no container of this proxy, or 'unknown' "
                                  "before the engine first answered."},
        "ready": _nullable({"type": "boolean"}, "Whether health_path answers 200; null when not running."),
        "container_id": _nullable({"type": "string"}, "Docker's full container id; null when not found."),
        "image": _nullable({"type": "string"}, "The image the container was made from."),
        "started_at": _nullable({"type": "string"},
                                "When it last started, Docker's RFC 3339 time (nanoseconds, 'Z'); "
                                "null when never started or not found."),
        "exit_code": _nullable({"type": "integer"}, "The last exit code; null while running or when not found."),
        "oom_killed": _nullable({"type": "boolean"}, "Whether the kernel killed it for memory; null when not found."),
        "progress": _nullable(PULL_PROGRESS, "The image pull's progress while the state is pulling; null otherwise."),
        "port": {"type": "integer", "minimum": 1, "maximum": 65535,
                 "description": "The host port (on 127.0.0.1) that the proxy forwards to."},
        "stale": _nullable({"type": "boolean"},
                           "True when the container was made from another service config than the "
                           "current one (restart it to apply the change); null when not found."),
        "in_flight": {"type": "integer", "minimum": 0, "description": "Requests in flight, all workers."},
        "queued": {"type": "integer", "minimum": 0, "description": "Requests waiting for a slot, all workers."},
        "engine": {"type": "string", "enum": ["reachable", "unreachable", "unknown"],
                   "description": "unreachable: the Docker engine does not answer, and the rest is the last "
                                  "known; unknown: not asked yet (the proxy has just started)."},
        "aliases": {"type": "array", "items": {"type": "string"},
                    "description": "More model names routed to it (services.<id>.aliases)."},
        "group": _nullable({"type": "string"}, "Its group (services.<id>.group); null when none."),
        "exclusive": {"type": "boolean", "description": "Whether its group is exclusive (false without a group)."},
        "gpus": _nullable({"oneOf": [{"type": "string", "enum": ["all"]}, {"type": "integer", "minimum": 1},
                                     {"type": "array", "items": {"type": "string"}}]},
                          "The GPUs it asks for (resources.gpus): 'all', a count or device ids; null: none."),
        "autostart": {"type": "boolean", "description": "Whether a request starts it when it is not running."},
        "idle_timeout": _nullable({"type": "number", "minimum": 0, "exclusiveMinimum": True},
                                  "Seconds without a request before it is stopped; null: never."),
        "idle_seconds_left": _nullable({"type": "number", "minimum": 0},
                                       "Seconds before it is stopped for being idle; null when no idle stop "
                                       "is due (no idle_timeout, not running, or requests in flight)."),
    },
}

ERROR = {
    "type": "object",
    "description": "Every error the proxy itself produces (not a backend's), in OpenAI's shape.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code", "service_id", "source"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "description": "OpenAI-style error type, by status."},
                "code": {"type": "string", "description": "What exactly went wrong."},
                "service_id": _nullable({"type": "string"}, "The service concerned, if any."),
                "source": {"type": "string", "enum": ["proxy"]},
                "hint": {"type": "string", "description": "A plain next step."},
                "last_status": {"allOf": [{"$ref": "#/components/schemas/ContainerStatus"}],
                                "description": "start_timeout of a start that waited: the last status seen."},
                "exit_code": _nullable({"type": "integer"}, "container_exited, oom_killed, start_timeout: "
                                                             "the container's exit code."),
                "oom_killed": {"type": "boolean", "description": "Whether the kernel killed it for memory."},
                "logs": {"type": "array", "items": {"type": "string"},
                         "description": "The container's last 30 log lines, secrets masked."},
            },
        },
    },
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(status: int, codes: dict[str, str]) -> dict:
    """An error response: the envelope, narrowed to the given codes (code -> when)."""
    description = "; ".join(f"`{code}`: {when}" for code, when in codes.items())
    narrowed = {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "code": {"type": "string", "enum": list(codes)},
        "type": {"type": "string", "enum": [ERROR_TYPES.get(status, "server_error")]},
    }}}}
    return _json({"allOf": [{"$ref": "#/components/schemas/Error"}, narrowed]}, description)


# What any request may get before its route runs (proxy/routes/cross_site.py).
_HOST_NOT_ALLOWED = {"host_not_allowed": "the Host header names no host of server.allowed_hosts"}
_FOREIGN_ORIGIN = _error(403, {"origin_not_allowed": "sent by a web page whose origin is neither the "
                                                     "proxy's own nor in server.cors_origins"})
_UNKNOWN_SERVICE = _error(404, {"service_not_found": "no such service in the config",
                                "not_found": "the id holds a '/', so no route matches"})
_DOCKER_DOWN = _error(503, {"docker_unavailable": "the Docker engine cannot be reached (forwarding goes on)"})
_START_FAILURES = {code: when for code, (status, when) in START_FAILURES.items() if status == 500}

SERVICE_ID = {
    "name": "service_id", "in": "path", "required": True,
    "description": "A service id from the config.",
    "schema": {"type": "string", "pattern": _SERVICE_ID_PATTERN},
}

DRAIN = {
    "name": "drain", "in": "query", "required": False,
    "description": "Let requests in flight finish first (up to drain_timeout); false stops at once.",
    "schema": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"], "default": "true"},
}

WAIT = {
    "name": "wait", "in": "query", "required": False,
    "description": "Answer once the service is ready (200), rather than at once (202). Case-insensitive.",
    "schema": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"], "default": "false"},
}

TIMEOUT = {
    "name": "timeout", "in": "query", "required": False,
    "description": "With wait=true: seconds to wait for ready (an image pull included) before answering 504.",
    "schema": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 3600, "default": 300},
}

def _flag(name: str, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"], "default": "false"}}


LOG_PARAMETERS = [
    {"name": "tail", "in": "query", "required": False,
     "description": "How many of the last lines to give: a number, or 'all'.",
     "schema": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000000},
                          {"type": "string", "enum": ["all"]}], "default": 200}},
    _flag("follow", "Go on streaming new lines until the container stops (or the client leaves)."),
    {"name": "since", "in": "query", "required": False,
     "description": "Only lines written in the last this many seconds.",
     "schema": {"type": "number", "minimum": 0, "maximum": 315360000}},
    _flag("timestamps", "Begin each line with Docker's RFC 3339 timestamp of it."),
]


def _paths() -> dict:
    return {
        "/healthz": {"get": {
            "operationId": "healthz", "tags": ["health"],
            "summary": "Is the proxy up, which version, and can it reach the Docker engine",
            "responses": {"200": _json({
                "type": "object", "required": ["status", "version", "docker_reachable", "services"],
                "properties": {"status": {"type": "string", "enum": ["ok"]}, "version": {"type": "string"},
                               "docker_reachable": {"type": "boolean"},
                               "services": {"type": "integer", "minimum": 0,
                                            "description": "How many services the config has."}},
            }, "The proxy is up.")},
        }},
        "/api/v1/openapi.json": {"get": {
            "operationId": "openapi", "tags": ["admin"], "summary": "This document",
            "responses": {"200": _json({"type": "object", "required": ["openapi", "info", "paths"]},
                                       "The OpenAPI document of the admin API.")},
        }},
        "/api/v1/services": {"get": {
            "operationId": "listServices", "tags": ["admin"], "summary": "Every configured service's status",
            "responses": {
                "200": _json({"type": "object", "required": ["services"], "properties": {
                    "services": {"type": "array", "items": {"$ref": "#/components/schemas/ContainerStatus"}}}},
                    "One status per configured service, in config order."),
                "503": _DOCKER_DOWN,
            },
        }},
        "/api/v1/events": {"get": {
            "operationId": "events", "tags": ["admin"],
            "summary": "The live event feed (Server-Sent Events): a snapshot, then one event per change",
            "description": "First `event: snapshot`, whose data is `{\"services\": [ContainerStatus, ...]}` as "
                           "GET /api/v1/services answers; then `event: service` per change of a service's "
                           "state, status, reason or progress (at most once a second while pulling), with "
                           "data `{service_id, state, status, reason, progress, time}` (time: ISO-8601 UTC), "
                           "plus `exit_code` and `oom_killed` when its container exited; `event: reload` "
                           "when the config was reloaded, with data `{added, removed, restarted, updated, "
                           "time}`. A `: keep-alive` comment after 15 s of silence. The answer does not end "
                           "while the client reads.",
            "responses": {"200": {"description": "The event stream.",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
        }},
        "/api/v1/service/{service_id}/logs": {"get": {
            "operationId": "serviceLogs", "tags": ["admin"],
            "summary": "The container's stdout and stderr, one log line per line, the configured secrets masked",
            "description": "Also of a container that failed or exited, until the service's next start. With "
                           "follow=true the answer goes on until the container stops.",
            "parameters": [SERVICE_ID, *LOG_PARAMETERS],
            "responses": {
                "200": {"description": "The log lines.",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                "400": _error(400, {"invalid_parameter": "bad tail, follow, since or timestamps",
                                    **_HOST_NOT_ALLOWED}),
                "404": _error(404, {"service_not_found": "no such service in the config",
                                    "no_container": "the service has no container (never started, or stopped "
                                                    "and removed)",
                                    "not_found": "the id holds a '/', so no route matches"}),
                "503": _DOCKER_DOWN,
            },
        }},
        "/api/v1/container/{service_id}": {"get": {
            "operationId": "containerStatus", "tags": ["admin"], "summary": "One service's status",
            "parameters": [SERVICE_ID],
            "responses": {
                "200": _json({"$ref": "#/components/schemas/ContainerStatus"}, "Its status."),
                "404": _UNKNOWN_SERVICE,
                "503": _DOCKER_DOWN,
            },
        }},
        "/api/v1/service/{service_id}/start": {"post": {
            "operationId": "startService", "tags": ["admin"], "summary": "Create and start the service's container",
            "parameters": [SERVICE_ID, WAIT, TIMEOUT],
            "responses": {
                "200": _json({"allOf": [{"$ref": "#/components/schemas/ContainerStatus"}, {
                    "type": "object", "required": ["message"],
                    "properties": {"message": {"type": "string"}, "state": {"type": "string", "enum": ["ready"]}}}]},
                    "wait=true: the container runs and health_path answers 200."),
                "202": _json({"allOf": [{"$ref": "#/components/schemas/ContainerStatus"}, {
                    "type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}}]},
                    "Under way (pulling its image, creating, or waiting for a swap's drain or a stop); not "
                    "waited for."),
                "400": _error(400, {"invalid_parameter": "bad wait or timeout", **_HOST_NOT_ALLOWED}),
                "404": _UNKNOWN_SERVICE,
                "409": _error(409, {"already_running": "already running or being started",
                                    "name_conflict": "a container not made by this proxy holds the name"}),
                "500": _error(500, _START_FAILURES),
                "503": _DOCKER_DOWN,
                "504": _error(504, {"start_timeout": "not ready in time (the wait's timeout, or the service's "
                                                     "start_timeout); see error.last_status"}),
            },
        }},
        "/api/v1/service/{service_id}/stop": {"post": {
            "operationId": "stopService", "tags": ["admin"],
            "summary": "Drain (up to drain_timeout), then stop (SIGTERM, then SIGKILL after stop_timeout) and "
                       "remove the service's container",
            "parameters": [SERVICE_ID, DRAIN],
            "responses": {
                "200": _json({"allOf": [{"$ref": "#/components/schemas/ContainerStatus"}, {
                    "type": "object", "required": ["message"], "properties": {
                        "message": {"type": "string"},
                        "drained": {"type": "integer", "minimum": 0,
                                    "description": "Requests in flight that finished before the stop."},
                        "cut": {"type": "integer", "minimum": 0,
                                "description": "Requests still in flight when the container was stopped."},
                    }}]}, "Stopped and removed (exit_code is the stopped container's), or it was not running."),
                "400": _error(400, {"invalid_parameter": "bad drain", **_HOST_NOT_ALLOWED}),
                "404": _UNKNOWN_SERVICE,
                "500": _error(500, {"stop_failed": "Docker refused to stop or remove it"}),
                "503": _DOCKER_DOWN,
            },
        }},
    }


_UNAUTHORIZED = {**_error(401, {"unauthorized": "no or a wrong 'Authorization: Bearer <admin_token>'"}),
                 "headers": {"WWW-Authenticate": {"schema": {"type": "string"},
                                                  "description": "Bearer challenge (RFC 6750)."}}}


def document(service_ids: Iterable[str] = (), *, admin_token: bool = False) -> dict:
    """The OpenAPI 3.0 document for one config.

    Args:
        service_ids: the configured services; the first is the example id.
        admin_token: whether ``server.admin_token`` is set, so every /api/v1 call needs it.
    """
    paths = _paths()
    ids = list(service_ids)
    service_id = SERVICE_ID
    if ids:
        service_id = {**SERVICE_ID, "example": ids[0],
                      "description": f"A service id from the config: {', '.join(ids)}."}
    for path, item in paths.items():
        for operation in item.values():
            if "parameters" in operation:
                operation["parameters"] = [service_id if p is SERVICE_ID else p for p in operation["parameters"]]
            operation["responses"].setdefault("400", _error(400, _HOST_NOT_ALLOWED))
            operation["responses"]["403"] = _FOREIGN_ORIGIN
            if admin_token and path.startswith("/api/"):
                operation["security"] = [{"adminToken": []}]
                operation["responses"]["401"] = _UNAUTHORIZED
    components = {"schemas": {"ContainerStatus": CONTAINER_STATUS, "Error": ERROR}}
    if admin_token:
        components["securitySchemes"] = {"adminToken": {"type": "http", "scheme": "bearer",
                                                        "description": "server.admin_token"}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "inference-proxy admin API",
            "version": __version__,
            "description": "Start, stop and report the model servers' containers. Every error the proxy "
                           "itself produces has the `Error` shape. Requests to /service/{id}/{path} are "
                           "forwarded to the service's backend and are not described here.",
        },
        "paths": paths,
        "components": components,
    }
