"""Who may call the proxy: a bearer token for the admin API and the metrics, API keys for
the proxy routes.

Both are off unless configured (``server.admin_token``, ``server.api_keys``). A check is
registered only for what is configured, and only for its own blueprint's requests, so the
forwarding path pays nothing when no API keys are set. ``/healthz`` is always open.

The key meant for the proxy is not forwarded: after a successful check the
``Authorization`` header that carried a proxy key, and any ``X-Api-Key``, are removed from
the WSGI environ, which is where the forwarder reads the headers it sends upstream. An
``Authorization`` header with another value, sent beside the proxy key in ``X-Api-Key``,
stays: it may be the backend's own key.

Tokens are compared in constant time, as bytes, against every key (no early exit), and
never logged: refusals log the error code and message only.
"""
from __future__ import annotations

import hmac

from flask import Flask, request

from . import admin, metrics, openai, service
from ..config import ServerConfig
from ..errors import Unauthorized

_REALM = 'Bearer realm="inference-proxy"'


def _refused(message: str, *, presented: bool, **kwargs) -> Unauthorized:
    """401 with a ``WWW-Authenticate: Bearer`` challenge (RFC 6750): a token that was sent
    but is wrong gets error="invalid_token", a missing one none."""
    challenge = f'{_REALM}, error="invalid_token"' if presented else _REALM
    return Unauthorized(message, headers={"WWW-Authenticate": challenge}, **kwargs)


def register_auth(app: Flask, server: ServerConfig) -> None:
    """Install the checks that the config asks for, each on its blueprint's requests only."""
    if server.admin_token is None and not server.api_keys:
        return
    if server.admin_token is not None:
        check = _admin_check(server.admin_token)
        for blueprint in (admin.bp, metrics.bp):  # Prometheus sends it as a bearer token
            app.before_request_funcs.setdefault(blueprint.name, []).append(check)
    if server.api_keys:
        check = _api_key_check(server.api_keys)
        for blueprint in (service.bp, openai.bp):  # every route that reaches a model
            app.before_request_funcs.setdefault(blueprint.name, []).append(check)


def _admin_check(token: str):
    expected = token.encode()

    def check_admin_token() -> None:
        presented = _bearer(request.environ.get("HTTP_AUTHORIZATION"))
        if presented is None:
            raise _refused("The admin API and /metrics need 'Authorization: Bearer <token>' (server.admin_token)",
                               presented=False)
        if not hmac.compare_digest(presented, expected):
            raise _refused("Invalid admin token", presented=True)

    return check_admin_token


def _api_key_check(keys: tuple[str, ...]):
    expected = tuple(key.encode() for key in keys)

    def check_api_key() -> None:
        environ = request.environ
        bearer = _bearer(environ.get("HTTP_AUTHORIZATION"))
        # X-Api-Key is only ever meant for the proxy once keys are configured: never forwarded.
        header_key = environ.pop("HTTP_X_API_KEY", None)
        if bearer is not None and _is_key(bearer, expected):
            del environ["HTTP_AUTHORIZATION"]
            return
        if header_key is not None and _is_key(_as_bytes(header_key.strip()), expected):
            return  # any Authorization header is the backend's own: it stays
        service_id = (request.view_args or {}).get("service_id")
        if bearer is None and header_key is None:
            raise _refused("An API key is needed: send 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'",
                               presented=False, service_id=service_id)
        raise _refused("Invalid API key", presented=True, service_id=service_id)

    return check_api_key


def _bearer(value: str | None) -> bytes | None:
    """The credentials of an ``Authorization: Bearer <token>`` header (scheme in any case)."""
    if value is None:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return _as_bytes(credentials.strip())


def _as_bytes(text: str) -> bytes:
    # WSGI header values are latin-1 decoded text; the keys are ASCII (checked at load), so
    # any other character simply never matches. compare_digest needs bytes for non-ASCII.
    return text.encode("utf-8", "surrogateescape")


def _is_key(candidate: bytes, keys: tuple[bytes, ...]) -> bool:
    """Compared with every key, without stopping at the first match."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)
    return found
