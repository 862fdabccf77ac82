"""``GET /healthz``: is the proxy up, which version, and can it reach the Docker engine."""
from __future__ import annotations

import gevent.pool
from flask import Blueprint, current_app, jsonify

from .. import __version__

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    runtime = current_app.extensions["proxy"]
    # The events loop knows whether the engine answers; ask directly only before it tried.
    engines = [runtime.engines.get(name) for name in runtime.config.engines]
    answers = gevent.pool.Pool(len(engines)).map(_answers, engines)
    reachable = dict(zip(runtime.config.engines, answers))
    return jsonify(status="ok", version=__version__, docker_reachable=reachable["local"],
                   engines={engine.name: {"reachable": reachable[engine.name], "remote": engine.config.remote}
                            for engine in engines},
                   services=len(runtime.config.services))


def _answers(engine) -> bool:
    reachable = engine.states.engine_reachable
    if reachable is None:  # side by side with a short deadline: a hung engine cannot hold /healthz up
        reachable = engine.containers.ping(timeout=_PING_TIMEOUT)
    return reachable


_PING_TIMEOUT = 1.5
