"""The status page: ``GET /ui``, one HTML page with its script modules and stylesheet, all
served from the package (``proxy/ui/``): no build step, nothing from another host, so it
works on a machine without internet. ``GET /`` leads there.

The page holds no data. What it shows it fetches from this proxy's admin API, event stream,
logs and ``/v1``, each with the admin token or API key the user types in (kept in the tab's
``sessionStorage`` only, sent as ``Authorization: Bearer``). So the page and its files are
served without a token, but under the same Host and Origin rules as every route
(``cross_site`` runs before any blueprint), and with a Content-Security-Policy that lets it
load and call only its own origin and keeps it out of other sites' frames.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, redirect, render_template

from .. import __version__

_FILES = Path(__file__).resolve().parent.parent / "ui"

bp = Blueprint("ui", __name__, static_folder=str(_FILES / "static"), static_url_path="/ui/static",
               template_folder=str(_FILES / "templates"))

# Same-origin only, for everything the page loads or calls; no inline script or style.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@bp.get("/")
def root():
    return redirect("/ui")


@bp.get("/ui/")
def page_with_slash():
    return redirect("/ui")


@bp.get("/ui")
def page():
    response = Response(render_template("ui.html", version=__version__), mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.after_request
def guard_the_page(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
