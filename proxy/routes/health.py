"""``GET /healthz``: is the proxy up, which version, and can it reach the Docker engine."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from .. import __version__

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    runtime = current_app.extensions["proxy"]
    # The events loop knows whether the engine answers; ask directly only before it tried.
    reachable = runtime.states.engine_reachable
    if reachable is None:
        reachable = runtime.containers.ping()
    return jsonify(status="ok", version=__version__, docker_reachable=reachable,
                   services=len(runtime.config.services))
