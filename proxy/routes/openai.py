"""The OpenAI-compatible front door: ``/v1/...`` routed by the request's ``model``.

``POST /v1/chat/completions`` (and every other OpenAI-style POST route) reads the JSON
body's ``model``, finds the service by id or alias, and relays the request there,
starting the service first when it has ``autostart``. ``GET /v1/models`` lists every
service and alias with its state.
"""
from __future__ import annotations

import json
import time

from flask import Blueprint, current_app, jsonify, request

from ..errors import BodyTooLarge, InvalidRequest, ModelNotFound, ProxyError, UnsupportedMediaType
from ..forwarding.inbound import HeldBody
from ..forwarding.relay import Outgoing, body_too_large, relay
from ..forwarding.upstream import client_target, request_headers
from ..metrics.request_meter import RequestMeter

bp = Blueprint("openai", __name__)

_BLOCK = 64 * 1024  # a body without a length is read and counted this much at a time


def _invalid(message: str, code: str = "invalid_request") -> InvalidRequest:
    return InvalidRequest(message, code=code)


@bp.get("/v1/models")
def list_models():
    runtime = current_app.extensions["proxy"]
    data = []
    states = {}
    for name, service in runtime.config.models():
        if service.id not in states:
            states[service.id] = runtime.lifecycle.status(service, probe_health=False)
        status = states[service.id]
        data.append({"id": name, "object": "model", "created": 0, "owned_by": "inference-proxy",
                     "service_id": service.id, "state": status.state, "status": status.container.status,
                     "autostart": service.autostart})
    return jsonify(object="list", data=data)


@bp.post("/v1/<path:path>")
def route_by_model(path: str):
    """The body is read whole to find its model: its bytes count against the worker's
    ``server.max_buffered`` until the answer has been sent."""
    started = time.monotonic()
    runtime = current_app.extensions["proxy"]
    # Only JSON that says so: a page's form or text/plain fetch must never pass for a request.
    if request.mimetype != "application/json":
        sent = request.content_type
        raise UnsupportedMediaType(
            "The request body must be JSON sent with 'Content-Type: application/json'"
            + (f", not {sent[:100]!r}" if sent else "; none was sent"),
            hint="Send the header 'Content-Type: application/json'")
    held = runtime.buffered.hold()
    try:
        response = _forward_by_model(runtime, held, started)
    except BaseException:
        held.release()
        raise
    response.call_on_close(held.release)
    return response


def _forward_by_model(runtime, held: HeldBody, started: float):
    server = runtime.config.server
    body, payload = _read_json_body(server.max_json_body, held)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("The request body needs a 'model' naming one of GET /v1/models", "model_missing")
    service = runtime.config.service_for_model(model)
    if service is None:
        known = [name for name, _ in runtime.config.models()]
        raise ModelNotFound(f"The model '{model}' does not exist; known models: {', '.join(known) or 'none'}",
                            extra={"param": "model", "known_models": known})
    meter = RequestMeter(service.id, "openai", started)
    try:
        if service.max_body_size is not None and len(body) > service.max_body_size:
            raise body_too_large(service)
        if service.model_name and model != service.model_name:
            payload["model"] = service.model_name  # for backends that check the name they serve
            body = json.dumps(payload).encode()  # no deeper than what json.loads just took

        environ = request.environ
        trusted = server.is_trusted_proxy(environ.get("REMOTE_ADDR", ""))
        headers = request_headers(environ, service.upstream_host, trusted)
        headers["Content-Length"] = str(len(body))
        outgoing = Outgoing("POST", client_target(environ), headers, body)
        return relay(runtime, service, outgoing, environ, meter, loading_events=payload.get("stream") is True)
    except ProxyError as error:
        meter.refused(error.status)
        raise


def _read_json_body(cap: int, held: HeldBody) -> tuple[bytes, dict]:
    """The body (at most ``server.max_json_body``, counted in ``held``) and its JSON object."""
    too_large = BodyTooLarge(f"Request body over {cap} bytes", hint="server.max_json_body sets the limit")
    length = request.content_length
    stream = request.stream
    if length is not None:
        if length > cap:
            raise too_large  # refused before a byte of it is read
        held.add(length)
        body = stream.read(length)
    else:  # chunked: counted as it comes
        parts = []
        while block := stream.read(_BLOCK):
            if held.size + len(block) > cap:
                raise too_large
            held.add(len(block))
            parts.append(block)
        body = b"".join(parts)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise _invalid("The request body must be a JSON object with a 'model'", "invalid_json") from None
    if not isinstance(payload, dict):
        raise _invalid("The request body must be a JSON object with a 'model'", "invalid_json")
    return body, payload
