"""The HTTP surfaces, one blueprint each: the service passthrough, the OpenAI front door,
the admin API, the health check, the metrics and the status page; who may call which is
``auth``'s, and what browser pages may do is ``cross_site``'s."""
from __future__ import annotations

from collections import defaultdict

from flask import Flask

from ..config import Config
from ..forwarding.inbound import register_body_guard
from ..log import register_request_log
from . import admin, health, metrics, observe, openai, service, ui  # observe: more /api/v1 routes
from .auth import register_auth
from .cross_site import register_cross_site


def register_routes(app: Flask, config: Config) -> None:
    for blueprint in (health.bp, service.bp, admin.bp, openai.bp, metrics.bp, ui.bp):
        app.register_blueprint(blueprint)
    install_policies(app, config)


def install_policies(app: Flask, config: Config) -> None:
    """(Re)install the per-request checks a config decides: the request log at DEBUG, the
    body guard, Host and Origin, then credentials. A reload calls it again: the previous
    checks are replaced whole, between two requests (one assignment each); the hooks the
    blueprints registered themselves stay, after the checks."""
    own = app.extensions.get("proxy_blueprint_hooks")
    if own is None:  # the first time: what the blueprints brought
        own = app.extensions["proxy_blueprint_hooks"] = (_copy(app.before_request_funcs),
                                                         _copy(app.after_request_funcs))
    fresh = Flask(app.import_name)  # collects the checks, then hands them over at once
    server = config.server
    if server.log_level == "DEBUG":
        register_request_log(fresh)
    register_body_guard(fresh, server)
    register_cross_site(fresh, server)  # Host and Origin: before any route or credential
    register_auth(fresh, server)  # admin token, API keys: only what is configured
    app.before_request_funcs = _joined(fresh.before_request_funcs, own[0])
    app.after_request_funcs = _joined(fresh.after_request_funcs, own[1])


def _copy(hooks: dict) -> dict:
    return {name: list(funcs) for name, funcs in hooks.items()}


def _joined(checks: dict, own: dict) -> defaultdict:
    joined = defaultdict(list)
    for hooks in (checks, own):
        for name, funcs in hooks.items():
            joined[name].extend(funcs)
    return joined
