"""Every family the proxy records, and one small function per recording.

Labels are bounded: a configured service id or group name, and fixed words (a route, an
HTTP status code, a reason, a kind, an outcome, a stage); never a path, a model name from
a request or a client address. Families read at scrape time (in flight, queued, states,
the engine, the version) are ``collector``'s; there are no Gauges here (a Gauge added
here needs a ``multiprocess_mode``).

Under gunicorn every worker writes its own files in ``PROMETHEUS_MULTIPROC_DIR`` (set by
the master before this module is first imported, see ``multiproc``), and a scrape merges
them; in a single process the counts live in ``REGISTRY``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

from ..config import Config

disable_created_metrics()  # *_created series: not kept in multiprocess mode, so not at all

REGISTRY = CollectorRegistry()  # ours only: no process or Python collectors in plain mode

# 10 ms to 10 min: a short completion to a long generation on a slow model.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                   300.0, 600.0)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)
START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

ROUTES = ("service", "openai")
REJECT_REASONS = ("queue_full", "queue_timeout", "body_too_large", "not_running", "start_timeout",
                  "start_failed")
UPSTREAM_ERROR_KINDS = ("unreachable", "timeout", "broken_stream")
TOKEN_KINDS = ("prompt", "completion")
START_OUTCOMES = ("ready", "exited", "timeout", "failed")
START_STAGES = ("pull", "create", "ready")

REQUESTS = Counter(
    "inference_proxy_requests_total",
    "Requests for a service, by route (service: /service/<id>/..., openai: /v1) and the status "
    "code answered; 499: the client left before any answer.",
    ["service", "route", "code"], registry=REGISTRY)
REQUEST_DURATION = Histogram(
    "inference_proxy_request_duration_seconds",
    "From the request reaching the proxy to the last byte of the backend's answer (answers from "
    "the backend only).",
    ["service"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
TIME_TO_FIRST_BYTE = Histogram(
    "inference_proxy_time_to_first_byte_seconds",
    "From the request reaching the proxy to the first byte of the backend's answer body (for a "
    "stream: its first event), waiting for a start or a slot included.",
    ["service"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
REJECTED = Counter(
    "inference_proxy_rejected_total",
    "Requests the proxy refused without an answer from the backend, by reason.",
    ["service", "reason"], registry=REGISTRY)
UPSTREAM_ERRORS = Counter(
    "inference_proxy_upstream_errors_total",
    "Backend failures: unreachable (refused or reset before an answer, 502), timeout (no "
    "response headers within timeouts.read, 504), broken_stream (the answer broke off).",
    ["service", "kind"], registry=REGISTRY)
CLIENT_DISCONNECTS = Counter(
    "inference_proxy_client_disconnects_total",
    "Clients that left before their answer was complete (the backend was cut off).",
    ["service"], registry=REGISTRY)
TOKENS = Counter(
    "inference_proxy_tokens_total",
    "Tokens by kind, from the usage (else llama-server's timings) at the end of JSON answers "
    "and event streams.",
    ["service", "kind"], registry=REGISTRY)
TOKENS_PER_SECOND = Histogram(
    "inference_proxy_tokens_per_second",
    "Generation speed per answer, as llama-server reports it (timings.predicted_per_second).",
    ["service"], buckets=TOKENS_PER_SECOND_BUCKETS, registry=REGISTRY)
CONTAINER_STARTS = Counter(
    "inference_proxy_container_starts_total",
    "Containers started by the proxy, by outcome: ready, exited (while starting), timeout (not "
    "ready in time), failed (Docker refused).",
    ["service", "outcome"], registry=REGISTRY)
START_DURATION = Histogram(
    "inference_proxy_start_duration_seconds",
    "Time spent in each stage of a start: pull (the image), create (and start the container), "
    "ready (until health_path answered 200).",
    ["service", "stage"], buckets=START_BUCKETS, registry=REGISTRY)
SWAPS = Counter(
    "inference_proxy_swaps_total",
    "Services of an exclusive group stopped to make room for another.",
    ["group"], registry=REGISTRY)
IDLE_STOPS = Counter(
    "inference_proxy_idle_stops_total",
    "Services stopped after idle_timeout without a request.",
    ["service"], registry=REGISTRY)
BACKEND_SCRAPE_ERRORS = Counter(
    "inference_proxy_backend_scrape_errors_total",
    "Scrapes of a model server's own metrics that failed (no answer within 1 s, not 200, or "
    "not the Prometheus text format); that server's families are left out of that scrape.",
    ["service"], registry=REGISTRY)

# Children by label values, for the per-request recordings: .labels() takes a lock and
# builds a tuple each time. Filling these from two greenlets at once is harmless.
_requests: dict[tuple[str, str, int], object] = {}
_durations: dict[str, object] = {}
_first_bytes: dict[str, object] = {}
_tokens: dict[str, tuple[object, object]] = {}
_speeds: dict[str, object] = {}


def declare(config: Config) -> None:
    """Create every bounded series of the configured services at zero, so a dashboard's
    rate() has a series before the first event."""
    for service_id in config.services:
        for reason in REJECT_REASONS:
            REJECTED.labels(service_id, reason)
        for kind in UPSTREAM_ERROR_KINDS:
            UPSTREAM_ERRORS.labels(service_id, kind)
        for kind in TOKEN_KINDS:
            TOKENS.labels(service_id, kind)
        for outcome in START_OUTCOMES:
            CONTAINER_STARTS.labels(service_id, outcome)
        for stage in START_STAGES:
            START_DURATION.labels(service_id, stage)
        CLIENT_DISCONNECTS.labels(service_id)
        IDLE_STOPS.labels(service_id)
        BACKEND_SCRAPE_ERRORS.labels(service_id)
        REQUEST_DURATION.labels(service_id)
        TIME_TO_FIRST_BYTE.labels(service_id)
    for group, settings in config.groups.items():
        if settings.exclusive:
            SWAPS.labels(group)


# -- the request side --------------------------------------------------------------------

def count_request(service_id: str, route: str, code: int) -> None:
    key = (service_id, route, code)
    child = _requests.get(key)
    if child is None:
        child = _requests[key] = REQUESTS.labels(service_id, route, str(code))
    child.inc()


def observe_duration(service_id: str, seconds: float) -> None:
    child = _durations.get(service_id)
    if child is None:
        child = _durations[service_id] = REQUEST_DURATION.labels(service_id)
    child.observe(seconds)


def observe_first_byte(service_id: str, seconds: float) -> None:
    child = _first_bytes.get(service_id)
    if child is None:
        child = _first_bytes[service_id] = TIME_TO_FIRST_BYTE.labels(service_id)
    child.observe(seconds)


def record_rejected(service_id: str, reason: str) -> None:
    REJECTED.labels(service_id, reason).inc()


def record_upstream_error(service_id: str, kind: str) -> None:
    UPSTREAM_ERRORS.labels(service_id, kind).inc()


def record_client_disconnect(service_id: str) -> None:
    CLIENT_DISCONNECTS.labels(service_id).inc()


def record_tokens(service_id: str, prompt: int, completion: int) -> None:
    children = _tokens.get(service_id)
    if children is None:
        children = _tokens[service_id] = (TOKENS.labels(service_id, "prompt"), TOKENS.labels(service_id, "completion"))
    children[0].inc(prompt)
    children[1].inc(completion)


def observe_tokens_per_second(service_id: str, rate: float) -> None:
    child = _speeds.get(service_id)
    if child is None:
        child = _speeds[service_id] = TOKENS_PER_SECOND.labels(service_id)
    child.observe(rate)


# -- the lifecycle side --------------------------------------------------------------------

def record_start(service_id: str, outcome: str) -> None:
    """A container start this process made ended: ready, exited, timeout or failed."""
    CONTAINER_STARTS.labels(service_id, outcome).inc()


def observe_start_stage(service_id: str, stage: str, seconds: float) -> None:
    """How long one stage of a start took: pull, create or ready."""
    START_DURATION.labels(service_id, stage).observe(seconds)


def record_swap(group: str) -> None:
    SWAPS.labels(group).inc()


def record_idle_stop(service_id: str) -> None:
    IDLE_STOPS.labels(service_id).inc()


def record_backend_scrape_error(service_id: str) -> None:
    BACKEND_SCRAPE_ERRORS.labels(service_id).inc()
