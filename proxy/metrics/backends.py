"""The model servers' own metrics (llama-server's ``/metrics``), fetched when the proxy is
scraped and handed on with a ``service`` label.

Every service with a ``metrics_path`` whose container runs is asked at once, in parallel,
for at most ``SCRAPE_TIMEOUT`` seconds; one that does not answer in time, answers other
than 200 or not in the Prometheus text format is left out of this scrape and counted in
``inference_proxy_backend_scrape_errors_total``, so one stuck server costs a scrape at most
the timeout and never its other families.

Families keep their names, help and types. When several servers expose the same family,
their samples go under one HELP and TYPE, so the whole exposition stays valid; a family a
later server declares with another type is left out for that server. A label ``service``
of the server's own becomes ``exported_service`` (as Prometheus does). One exception to
"keep the type": prometheus_client models a counter as a name plus ``_total``, so a counter
whose name lacks ``_total`` (llama-server's ``llamacpp:n_tokens_max``) keeps its name and
is handed on untyped.
"""
from __future__ import annotations

import gevent
import gevent.pool
import requests
import urllib3.exceptions
from loguru import logger
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ..config import ServiceConfig
from .families import record_backend_scrape_error

SCRAPE_TIMEOUT = 1.0  # seconds for one server: connect, answer and body together
MAX_BYTES = 8 * 1024 * 1024  # a larger answer is not a metrics page
_ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"  # not OpenMetrics: another parser
_OWN_PREFIX = "inference_proxy_"  # the proxy's own names: never taken from a server


def backend_families(runtime) -> list[Metric]:
    """The merged families of every service that runs and has a metrics_path."""
    services = [service for service in runtime.config.services.values()
                if service.metrics_path and runtime.states.get(service.id).status in ("running", "unknown")]
    if not services:
        return []
    texts = gevent.pool.Pool(len(services)).map(lambda service: _fetch(runtime.upstream, service), services)
    merged: dict[str, Metric] = {}
    for service, text in zip(services, texts):
        families = None if text is None else _parse(text)
        if families is None:
            record_backend_scrape_error(service.id)
            continue
        _merge(merged, families, service.id)
    return list(merged.values())


def _fetch(pool, service: ServiceConfig) -> str | None:
    """The server's metrics page, or None (logged at DEBUG: a scrape runs every few seconds)."""
    url = f"http://{service.upstream_host}{service.metrics_path}"
    headers = {"Host": service.upstream_host, "Accept": _ACCEPT}
    text = problem = None
    with gevent.Timeout(SCRAPE_TIMEOUT, False):  # False: on timeout, leave the block quietly
        problem = f"no answer within {SCRAPE_TIMEOUT:g} s"
        try:
            response = pool.send("GET", url, headers, None, (SCRAPE_TIMEOUT, SCRAPE_TIMEOUT))
        except (requests.RequestException, OSError) as exc:
            problem = str(exc)
        else:
            try:
                body = response.raw.read(MAX_BYTES + 1, decode_content=True) if response.status_code == 200 else b""
                problem = (f"status {response.status_code}" if response.status_code != 200 else
                           f"over {MAX_BYTES} bytes" if len(body) > MAX_BYTES else None)
                text = None if problem else body.decode("utf-8")
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                problem = str(exc)
            except UnicodeDecodeError:
                problem = "not UTF-8 text"
            finally:
                response.close()
    if text is None:
        logger.debug("metrics of service {} not scraped: {}", service.id, problem)
    return text


def _parse(text: str) -> list[Metric] | None:
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, IndexError):  # what the parser raises on text that is not the format
        return None
    untotalled = _counters_without_total(text)
    for index, family in enumerate(families):
        if family.type == "counter" and family.name in untotalled:
            plain = Metric(family.name, family.documentation, "unknown", family.unit)
            plain.samples = [sample._replace(name=family.name) if sample.name == family.name + "_total" else sample
                             for sample in family.samples]
            families[index] = plain
    return families


def _counters_without_total(text: str) -> set[str]:
    """Names declared ``# TYPE <name> counter`` without the ``_total`` the parser adds."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) == 4 and parts[3] == "counter" and not parts[2].endswith("_total"):
                names.add(parts[2])
    return names


def _merge(merged: dict[str, Metric], families: list[Metric], service_id: str) -> None:
    for family in families:
        if family.name.startswith(_OWN_PREFIX):
            continue
        target = merged.get(family.name)
        if target is None:
            target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
        elif target.type != family.type:
            continue
        for sample in family.samples:
            labels = dict(sample.labels)
            if "service" in labels:
                labels["exported_service"] = labels.pop("service")
            labels["service"] = service_id
            target.samples.append(sample._replace(labels=labels))
