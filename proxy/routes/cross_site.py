"""What web pages in a browser may do with the proxy: the Host check against DNS rebinding,
the Origin check against cross-site requests, and the CORS answers for allowed origins.

The proxy listens on loopback without credentials by default, so any page its user visits
could otherwise drive it: a "simple" cross-site POST (a form, or ``fetch`` in ``no-cors``
mode) needs no preflight, so the browser sends it and only hides the answer, and it would
start containers and spend GPU time. A page whose own name is rebound to 127.0.0.1 is
same-origin with the proxy and reads every answer. So, before any route or credential check:

- ``Host`` (the port ignored) must be localhost, a loopback address, ``server.host`` or one
  of ``server.allowed_hosts``, else 400 ``host_not_allowed``. A rebinding page always sends
  its own name; ``/healthz`` is checked too, since reading answers is what rebinding is for.
- A request with an ``Origin`` header comes from a page (browsers send it on every POST, PUT,
  PATCH and DELETE and on every cross-origin fetch). It is refused with 403
  ``origin_not_allowed`` unless the origin is the proxy's own (its host and port are the
  request's Host) or listed in ``server.cors_origins``. Every method is refused, not only the
  state-changing ones: an ``autostart`` service starts on a GET too, and llama-server
  reflects any Origin in ``Access-Control-Allow-Origin``, which would let the page read the
  answer. Requests without Origin (curl, SDKs) are not concerned.
- What a page embeds (``<img>``, ``<script>``, ``<iframe>``) carries no Origin, and a GET can
  start an ``autostart`` service. Browsers mark those with ``Sec-Fetch-Site``: one from
  another site's page (``cross-site``, or ``same-site`` as another port of 127.0.0.1 is) is
  refused with the same 403, except a top-level GET navigation (the user following a link).
- A CORS preflight (OPTIONS with ``Access-Control-Request-Method``) from an allowed origin is
  answered here with 204, before any API key or token is asked for (browsers never send
  credentials on a preflight); other OPTIONS requests go on to their route (and so to a
  backend under ``/service/<id>/``). Answers to allowed origins carry
  ``Access-Control-Allow-Origin`` and ``Vary: Origin``.

Cost per request: three environ lookups and a cached Host verdict; the response hook is
installed only when ``cors_origins`` is set.
"""
from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

from flask import Flask, Response, request

from ..config import ServerConfig
from ..config.fields import normal_host
from ..errors import HostNotAllowed, OriginNotAllowed

ALWAYS_ALLOWED_HOSTS = frozenset({"localhost"})  # with every loopback address and server.host
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# Named in every preflight answer: what the proxy and OpenAI-style clients send.
ALLOWED_HEADERS = ("Authorization", "Content-Type", "X-Api-Key")
PREFLIGHT_MAX_AGE = "600"  # seconds a browser may reuse a preflight answer
_OTHER_SITES = frozenset({"cross-site", "same-site"})  # Sec-Fetch-Site values of another page
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}\Z")  # an RFC 9110 token


def register_cross_site(app: Flask, server: ServerConfig) -> None:
    hosts = HostCheck(server)
    origins = frozenset(server.cors_origins)
    any_origin = "*" in origins

    def allowed_origin(origin: str) -> bool:
        return any_origin or origin.lower() in origins

    def guard_browser_requests():
        environ = request.environ
        host = environ.get("HTTP_HOST")
        if host is not None and not hosts.allows(host):
            raise HostNotAllowed(
                f"The Host header names a host this proxy does not answer to: {host[:200]!r}",
                hint="Reach the proxy by localhost or its address, or add the name to server.allowed_hosts")
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            if environ.get("HTTP_SEC_FETCH_SITE") in _OTHER_SITES and not _top_level_navigation(environ):
                raise OriginNotAllowed(
                    "Requests that another site's page makes without an Origin (an image, a script, "
                    "a frame) are not allowed",
                    hint="Open the proxy's URL directly, or call it with fetch from an origin in "
                         "server.cors_origins")
            return None
        if not (allowed_origin(origin) or _same_origin(origin, host)):
            raise OriginNotAllowed(
                f"Requests from web pages of origin {origin[:200]!r} are not allowed",
                hint="List the page's origin in server.cors_origins to let it call the proxy")
        if environ["REQUEST_METHOD"] == "OPTIONS" and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ:
            return _preflight(origin, environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS"))
        return None

    app.before_request_funcs.setdefault(None, []).append(guard_browser_requests)
    if not origins:
        return  # no cross-origin page is ever allowed: no CORS headers to add

    def allow_the_origin(response: Response) -> Response:
        origin = request.environ.get("HTTP_ORIGIN")
        if origin is not None and allowed_origin(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.vary.add("Origin")
        return response

    app.after_request_funcs.setdefault(None, []).append(allow_the_origin)


class HostCheck:
    """Whether a Host header value names a host the proxy answers to."""

    def __init__(self, server: ServerConfig):
        self.any = "*" in server.allowed_hosts
        names = set(server.allowed_hosts) | ALWAYS_ALLOWED_HOSTS
        if normal_host(server.host) is not None:
            names.add(normal_host(server.host))
        self.names = frozenset(names)
        # A few distinct Host values come again and again: decide each once.
        self.allows = lru_cache(maxsize=256)(self._allows)

    def _allows(self, header: str) -> bool:
        if self.any:
            return True
        host = normal_host(_without_port(header))
        return host is not None and (host in self.names or _is_loopback(host))


def _without_port(header: str) -> str:
    """"name:port" -> "name"; "[v6]:port" -> "[v6]"; a bare IPv6 address stays whole."""
    if header.startswith("["):
        return header.partition("]")[0] + "]"
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _top_level_navigation(environ: dict) -> bool:
    """The user following a link or typing the URL: a GET into a tab, not into a page."""
    return (environ["REQUEST_METHOD"] in ("GET", "HEAD") and environ.get("HTTP_SEC_FETCH_MODE") == "navigate"
            and environ.get("HTTP_SEC_FETCH_DEST", "document") == "document")


def _same_origin(origin: str, host: str | None) -> bool:
    """A page of the proxy itself: its origin's host and port are the request's Host, which
    the host check has already accepted (so a rebound name never counts as the proxy's)."""
    _, sep, authority = origin.partition("://")
    return bool(sep) and host is not None and authority.lower() == host.lower()


def _preflight(origin: str, requested_headers: str | None) -> Response:
    response = Response(status=204)
    del response.headers["Content-Type"]  # no body
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
    # The headers the page asks for, so clients that add their own (SDK telemetry headers)
    # work through /service/<id>/ too; the proxy's own ones always.
    names = list(ALLOWED_HEADERS)
    for name in (requested_headers or "").split(",")[:50]:
        name = name.strip()
        if _HEADER_NAME.match(name) and name.lower() not in (known.lower() for known in names):
            names.append(name)
    response.headers["Access-Control-Allow-Headers"] = ", ".join(names)
    response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    response.vary.update(("Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"))
    return response
