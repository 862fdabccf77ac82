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

from ..errors import BodyTooLarge, InvalidRequest, ModelNotFound, ProxyError
from ..forwarding.relay import Outgoing, body_too_large, relay
from ..forwarding.upstream import client_target, request_headers
from ..metrics.request_meter import RequestMeter

bp = Blueprint("openai", __name__)

# A chat request's JSON (long contexts, base64 images) stays well below this; the limit
# only bounds what one request may make the proxy hold while it reads the model name.
_DEFAULT_MAX_JSON_BODY = 64 * 1024 * 1024


def _invalid(message: str, code: str = "invalid_request") -> InvalidRequest:
    return InvalidRequest(message, code=code)


@bp.get("/v1/models")
def list_models():
    runtime = current_app.extensions["proxy"]
    data = []
    for name, service in runtime.config.models():
        state = runtime.states.state(service.id)
        data.append({"id": name, "object": "model", "created": 0, "owned_by": "inference-proxy",
                     "service_id": service.id, "state": state.status, "autostart": service.autostart})
    return jsonify(object="list", data=data)


@bp.post("/v1/<path:path>")
def route_by_model(path: str):
    started = time.monotonic()
    runtime = current_app.extensions["proxy"]
    body, payload = _read_json_body()
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
            body = json.dumps(payload).encode()

        environ = request.environ
        headers = request_headers(environ, service.upstream_host)
        headers["Content-Length"] = str(len(body))
        outgoing = Outgoing("POST", client_target(environ), headers, body)
        return relay(runtime, service, outgoing, environ, meter, loading_events=payload.get("stream") is True)
    except ProxyError as error:
        meter.refused(error.status)
        raise


def _read_json_body() -> tuple[bytes, dict]:
    length = request.content_length
    if length is not None and length > _DEFAULT_MAX_JSON_BODY:
        raise BodyTooLarge(f"Request body over {_DEFAULT_MAX_JSON_BODY} bytes")
    body = request.stream.read(_DEFAULT_MAX_JSON_BODY + 1)
    if len(body) > _DEFAULT_MAX_JSON_BODY:
        raise BodyTooLarge(f"Request body over {_DEFAULT_MAX_JSON_BODY} bytes")
    try:
        payload = json.loads(body)
    except ValueError:
        raise _invalid("The request body must be a JSON object with a 'model'", "invalid_json") from None
    if not isinstance(payload, dict):
        raise _invalid("The request body must be a JSON object with a 'model'", "invalid_json")
    return body, payload
