"""The inference proxy: a Flask app that forwards to, starts and stops local model servers.

``create_app`` is the only place where the parts are wired together. Nothing here runs at
import time: no Docker client, no HTTP session, no app (gevent must patch a worker first).
"""
from __future__ import annotations

__version__ = "0.2.0"


def create_app(config=None, docker_client=None):
    """Build the WSGI app.

    Args:
        config: a ``proxy.config.Config``. When None: the one the gunicorn master accepted
            (``proxy.config.accepted``), else loaded from ``--config``/``PROXY_CONFIG``/
            ``./config.yaml``.
        docker_client: a ``docker.DockerClient`` to use instead of one made from the
            environment (tests inject one; it is never made at import).

    Returns:
        The Flask app. ``app.extensions["proxy"]`` holds the per-process runtime.
    """
    from flask import Flask

    from .config import config_path, load_config
    from .config.accepted import accepted
    from .errors import register_error_handlers
    from .forwarding.inbound import register_body_guard
    from .log import register_request_log, setup_logging
    from .metrics.families import declare
    from .routes import register_routes
    from .runtime import Runtime

    if config is None:
        config = accepted() or load_config(config_path())
    setup_logging(config.server.log_level, config.secrets)

    app = Flask(__name__)
    app.extensions["proxy"] = Runtime(config, docker_client=docker_client)
    register_error_handlers(app)
    if config.server.log_level == "DEBUG":
        register_request_log(app)
    register_body_guard(app, config.server)
    register_routes(app, config)
    declare(config)  # every bounded series at zero, before the first request
    app.extensions["proxy"].start()
    return app
