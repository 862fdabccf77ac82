"""The ``/api/v1`` blueprint: start, stop and report the services' containers."""
from __future__ import annotations

import gevent.pool
from flask import Blueprint, current_app, jsonify, request
from loguru import logger

from ..config import ServiceConfig
from ..services.containers import ContainerInfo, config_hash
from ..errors import InvalidRequest, ProxyError, ServiceNotFound
from .openapi import document
from ..services.readiness import probe, wait_ready

bp = Blueprint("admin", __name__, url_prefix="/api/v1")

_DEFAULT_WAIT_SECONDS = 300.0
_MAX_WAIT_SECONDS = 3600.0


def _runtime():
    return current_app.extensions["proxy"]


def _service(service_id: str) -> ServiceConfig:
    service = _runtime().config.services.get(service_id)
    if service is None:
        raise ServiceNotFound(service_id)
    return service


def _report(runtime, service: ServiceConfig, info: ContainerInfo, ready: bool | None = None) -> dict:
    """The status fields every admin answer shares; ``stale``: made from another config."""
    if ready is None and info.running:
        ready = probe(runtime.upstream, service)
    stale = None if info.config_hash is None else info.config_hash != config_hash(service)
    return {
        "service_id": service.id,
        "status": info.status,
        "ready": ready if info.running else None,
        "container_id": info.container_id,
        "image": info.image,
        "started_at": info.started_at,
        "exit_code": info.exit_code,
        "oom_killed": info.oom_killed,
        "port": service.port,
        "stale": stale,
    }


@bp.post("/service/<service_id>/start")
def start_service(service_id: str):
    service = _service(service_id)
    wait, timeout = _wait_arguments()
    runtime = _runtime()
    logger.info("start {} requested{}", service_id, f" (waiting up to {timeout:g} s)" if wait else "")
    info = runtime.containers.start(service)
    runtime.states.update(info)
    if not wait:
        return jsonify(message=f"Container '{service_id}' starting", service_id=service_id, status="starting"), 202

    outcome, info = wait_ready(runtime.upstream, service, lambda: runtime.containers.inspect(service), timeout)
    report = _report(runtime, service, info, ready=outcome == "ready")
    if outcome == "ready":
        logger.info("service {} is ready", service_id)
        return jsonify(message=f"Container '{service_id}' is ready", **{**report, "status": "ready"}), 200
    if outcome == "exited":
        logger.error("service {} exited while starting (exit code {})", service_id, info.exit_code)
        raise ProxyError(f"Container '{service_id}' exited while starting (exit code {info.exit_code})",
                         status=500, code="container_exited", service_id=service_id,
                         hint=f"See its output with: docker logs {runtime.containers.name(service_id)}",
                         extra={"last_status": report})
    logger.warning("service {} not ready after {:g} s", service_id, timeout)
    raise ProxyError(f"Container '{service_id}' was not ready within {timeout:g} s", status=504,
                     code="start_timeout", service_id=service_id,
                     hint="It may still be loading; check GET /api/v1/container/" + service_id,
                     extra={"last_status": report})


def _wait_arguments() -> tuple[bool, float]:
    wait_text = request.args.get("wait", "false").lower()
    if wait_text not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidRequest("Query parameter 'wait' must be true or false", code="invalid_parameter")
    try:
        timeout = float(request.args.get("timeout", _DEFAULT_WAIT_SECONDS))
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= _MAX_WAIT_SECONDS:
        raise InvalidRequest(f"Query parameter 'timeout' must be a number of seconds in (0, {_MAX_WAIT_SECONDS:g}]",
                             code="invalid_parameter")
    return wait_text in ("true", "1", "yes"), timeout


@bp.post("/service/<service_id>/stop")
def stop_service(service_id: str):
    service = _service(service_id)
    runtime = _runtime()
    logger.info("stop {} requested", service_id)
    info, exit_code = runtime.containers.stop(service)
    if exit_code is None and not info.running:
        return jsonify(message=f"Container '{service_id}' is not running", service_id=service_id,
                       status=info.status), 200
    runtime.states.update(ContainerInfo(service_id=service_id, status="not found"))
    return jsonify(message=f"Container '{service_id}' stopped", service_id=service_id, status="stopped",
                   exit_code=exit_code), 200


@bp.get("/container/<service_id>")
def container_status(service_id: str):
    service = _service(service_id)
    runtime = _runtime()
    return jsonify(_report(runtime, service, runtime.containers.inspect(service)))


@bp.get("/services")
def list_services():
    runtime = _runtime()
    found = runtime.containers.list_managed()
    services = list(runtime.config.services.values())
    infos = [found.get(s.id, ContainerInfo(service_id=s.id, status="not found")) for s in services]
    # Health probes run side by side so one slow service does not hold up the list.
    reports = gevent.pool.Pool(16).map(lambda pair: _report(runtime, *pair), zip(services, infos)) if services else []
    return jsonify(services=reports)


@bp.get("/openapi.json")
def openapi_document():
    config = _runtime().config
    return jsonify(document(config.services, admin_token=config.server.admin_token is not None))
