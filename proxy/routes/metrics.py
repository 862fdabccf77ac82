"""``GET /metrics``: the proxy's families, every worker's, and the model servers' own, in
the Prometheus text format. Behind ``server.admin_token`` when it is set (``auth``)."""
from __future__ import annotations

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from ..metrics import multiproc
from ..metrics.backends import backend_families
from ..metrics.collector import ScrapeTimeCollector
from ..metrics.families import REGISTRY

bp = Blueprint("metrics", __name__)


class _Scrape:
    """Everything one scrape shows, as one collector for ``generate_latest``."""

    def __init__(self, runtime):
        self._runtime = runtime

    def collect(self):
        backends = backend_families(self._runtime)  # first: its failures count in this scrape
        # Under gunicorn: every worker's files, dead ones' included; else this process's.
        if multiproc.enabled():
            yield from MultiProcessCollector(None).collect()
        else:
            yield from REGISTRY.collect()
        yield from ScrapeTimeCollector(self._runtime).collect()
        yield from backends


@bp.get("/metrics")
def metrics():
    body = generate_latest(_Scrape(current_app.extensions["proxy"]))
    return Response(body, status=200, content_type=CONTENT_TYPE_PLAIN_0_0_4)
