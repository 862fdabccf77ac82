"""The HTTP surfaces, one blueprint each: the service passthrough, the OpenAI front door,
the admin API, the health check, the metrics and the status page; who may call which is
``auth``'s, and what browser pages may do is ``cross_site``'s."""
from __future__ import annotations

from flask import Flask

from ..config import Config
from . import admin, health, metrics, observe, openai, service, ui  # observe: more /api/v1 routes
from .auth import register_auth
from .cross_site import register_cross_site


def register_routes(app: Flask, config: Config) -> None:
    register_cross_site(app, config.server)  # Host and Origin: before any route or credential
    register_auth(app, config.server)  # admin token, API keys: only what is configured
    for blueprint in (health.bp, service.bp, admin.bp, openai.bp, metrics.bp, ui.bp):
        app.register_blueprint(blueprint)
