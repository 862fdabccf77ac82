"""The ``/api/v1`` blueprint: start, stop and report the services. Thin: every start and
stop is the lifecycle owner's; every status comes from what the workers already know (no
Docker call, so a hung engine cannot hold an answer up)."""
from __future__ import annotations

import gevent
import gevent.pool
from flask import Blueprint, current_app, jsonify, request
from loguru import logger

from ..config import ServiceConfig
from ..config.diff import ConfigChange
from ..errors import ConfigInvalid, InvalidRequest, ServiceNotFound, StartTimeout
from ..services.engine import config_hash
from ..services.states import READY
from .openapi import document

bp = Blueprint("admin", __name__, url_prefix="/api/v1")

_DEFAULT_WAIT_SECONDS = 300.0
_MAX_WAIT_SECONDS = 3600.0
_ACCEPT_WAIT = 2.5  # seconds a start without wait may take to be under way before the answer
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_CHANGE_KINDS = tuple(ConfigChange.__dataclass_fields__)
_ENGINE_WORDS = {True: "reachable", False: "unreachable", None: "unknown"}  # None: not asked yet


def _runtime():
    return current_app.extensions["proxy"]


def _service(service_id: str) -> ServiceConfig:
    service = _runtime().config.services.get(service_id)
    if service is None:
        raise ServiceNotFound(service_id)
    return service


def report(runtime, service: ServiceConfig, probe_health: bool = True) -> dict:
    """The status fields every admin answer shares."""
    status = runtime.lifecycle.status(service, probe_health=probe_health)
    engine = runtime.lifecycle.engine(service)
    info = status.container
    stale = None if info.config_hash is None else info.config_hash != config_hash(service)
    left = runtime.idle.seconds_left(service)
    gpus = service.resources.gpus
    return {
        "service_id": service.id,
        "state": status.state,
        "reason": status.reason,
        "status": info.status,
        "ready": (status.state == READY) if info.running else None,
        "container_id": info.container_id,
        "image": info.image,
        "started_at": info.started_at,
        "exit_code": info.exit_code,
        "oom_killed": info.oom_killed,
        "progress": status.progress,
        "port": service.port,
        "stale": stale,
        "in_flight": runtime.coordinator.in_flight(service.id),
        "queued": runtime.coordinator.waiting(service.id),
        "engine": _ENGINE_WORDS[engine.states.engine_reachable],  # whether its engine answers
        "engine_name": service.engine,
        "address": service.address,
        # What the config says about it, for the status page.
        "aliases": list(service.aliases),
        "group": service.group,
        "exclusive": service.group is not None and runtime.config.groups[service.group].exclusive,
        "gpus": list(gpus) if isinstance(gpus, tuple) else gpus,  # null, "all", a count, or device ids
        "autostart": service.autostart,
        "idle_timeout": service.idle_timeout,
        "idle_seconds_left": None if left is None else round(left, 1),
    }


@bp.post("/service/<service_id>/start")
def start_service(service_id: str):
    service = _service(service_id)
    wait, timeout = _wait_arguments()
    runtime = _runtime()
    logger.info("start {} requested{}", service_id, f" (waiting up to {timeout:g} s)" if wait else "")
    job = runtime.lifecycle.start(service)
    if not wait:
        gevent.wait([job.accepted, job.result], timeout=_ACCEPT_WAIT, count=1)
        if job.result.ready() and not job.result.successful():
            raise job.result.exception
        if not job.accepted.is_set():
            runtime.lifecycle.check_engine(service)  # the heartbeat may have found it hung meanwhile
        return jsonify(message=f"Container '{service_id}' starting", **report(runtime, service, False)), 202
    try:
        job.result.get(timeout=timeout)
    except gevent.Timeout:
        logger.warning("service {} not ready after {:g} s", service_id, timeout)
        raise StartTimeout(f"Container '{service_id}' was not ready within {timeout:g} s", service_id=service_id,
                           hint="It may still be loading; check GET /api/v1/container/" + service_id,
                           extra={"last_status": report(runtime, service, False)}) from None
    return jsonify(message=f"Container '{service_id}' is ready", **report(runtime, service)), 200


def _flag(name: str, default: bool) -> bool:
    text = request.args.get(name, "true" if default else "false").lower()
    if text not in _TRUE + _FALSE:
        raise InvalidRequest(f"Query parameter '{name}' must be true or false", code="invalid_parameter")
    return text in _TRUE


def _wait_arguments() -> tuple[bool, float]:
    wait = _flag("wait", False)
    try:
        timeout = float(request.args.get("timeout", _DEFAULT_WAIT_SECONDS))
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= _MAX_WAIT_SECONDS:
        raise InvalidRequest(f"Query parameter 'timeout' must be a number of seconds in (0, {_MAX_WAIT_SECONDS:g}]",
                             code="invalid_parameter")
    return wait, timeout


@bp.post("/service/<service_id>/stop")
def stop_service(service_id: str):
    service = _service(service_id)
    drain = _flag("drain", True)
    runtime = _runtime()
    runtime.lifecycle.check_engine(service)
    logger.info("stop {} requested{}", service_id, "" if drain else " (no drain)")
    outcome = runtime.lifecycle.stop(service, drain=drain)
    if not outcome.stopped:
        return jsonify(message=f"Container '{service_id}' is not running", **report(runtime, service, False)), 200
    answer = {**report(runtime, service, False), "exit_code": outcome.exit_code}  # the stopped container's
    return jsonify(message=f"Container '{service_id}' stopped", **answer, drained=outcome.drained, cut=outcome.cut), 200


@bp.get("/container/<service_id>")
def container_status(service_id: str):
    return jsonify(report(_runtime(), _service(service_id)))


def all_reports(runtime) -> list[dict]:
    """Every configured service's status, in config order."""
    services = list(runtime.config.services.values())
    # Health probes run side by side so one slow service does not hold up the list.
    return gevent.pool.Pool(16).map(lambda service: report(runtime, service), services) if services else []


@bp.get("/services")
def list_services():
    return jsonify(services=all_reports(_runtime()))


@bp.post("/reload")
def reload_config():
    """Read, check and apply the config file now; every worker follows within a second."""
    reloader = current_app.extensions.get("proxy_reloader")
    if reloader is None:
        raise InvalidRequest("This proxy was given its config directly, not from a file: nothing to reload",
                             code="reload_unavailable")
    outcome = reloader.reload()
    if outcome.problems:
        raise ConfigInvalid(f"The config file has {len(outcome.problems)} problem(s); nothing was changed",
                            extra={"problems": list(outcome.problems)},
                            hint="Fix the file and reload again; the running config stays in force")
    _runtime().coordinator.request_reload()  # the other workers reload now, watched or not
    change = outcome.change.to_dict() if outcome.change is not None else None
    message = "Configuration reloaded" if change is not None else "Configuration unchanged"
    return jsonify(message=message, changed=change or {kind: [] for kind in _CHANGE_KINDS}), 200


@bp.get("/openapi.json")
def openapi_document():
    config = _runtime().config
    return jsonify(document(config.services, admin_token=config.server.admin_token is not None))
