"""One request to one service, end to end: make sure the service can take it (starting it
on demand), admit it under the service's concurrency limit, send it upstream and stream
the answer back. Shared by ``/service/<id>/...`` and the OpenAI front door."""
from __future__ import annotations

import errno
import json
import time
from dataclasses import dataclass

import gevent
import requests
import urllib3.exceptions
from flask import Response
from gunicorn.http.errors import ParseException as MalformedBody
from loguru import logger

from ..config import ServiceConfig
from ..metrics.families import record_rejected, record_upstream_error
from ..metrics.request_meter import RequestMeter
from ..shared.coordinator import PHASE_STOPPING
from .disconnect import stop_watching, watch_client
from ..errors import (BodyTooLarge, InvalidRequest, ProxyError, TooManyRequests, UpstreamTimeout,
                      UpstreamUnreachable, answer)
from ..services.lifecycle import ClientLeft
from .upstream import Exchange, iter_body, response_headers

_LOADING_EVERY = 3.0  # seconds between ": loading" (or ": pulling ...") comments to a waiting event stream
_LOADING = b": loading\n\n"
# Why a request waiting for its service was refused, by the refusal's code.
_NOT_READY_REASONS = {"service_not_running": "not_running", "start_timeout": "start_timeout"}


def body_too_large(service: ServiceConfig) -> BodyTooLarge:
    record_rejected(service.id, "body_too_large")  # made only to be raised
    return BodyTooLarge(f"Request body is larger than the {service.max_body_size} bytes service "
                        f"'{service.id}' accepts", service_id=service.id,
                        hint=f"services.{service.id}.max_body_size sets the limit")


@dataclass
class Outgoing:
    """What goes upstream: method, raw target (path and query), headers and body."""

    method: str
    target: str
    headers: dict
    body: object


def relay(runtime, service: ServiceConfig, outgoing: Outgoing, environ: dict, meter: RequestMeter,
          loading_events: bool = False) -> Response:
    """Forward ``outgoing`` to ``service`` and answer with its streamed response.

    Args:
        meter: the request's metrics; a ProxyError raised from here is the caller's to
            count (``meter.refused``), everything else is counted here.
        loading_events: the client asked for an event stream; if the service has to be
            started first, answer at once with one and keep it alive with ": loading"
            comments while waiting.
    """
    label = f"{outgoing.method} {service.id}"
    exchange = Exchange(outgoing.target)
    watcher = watch_client(environ, exchange, label)
    deadline = time.monotonic() + service.start_timeout
    if loading_events and service.autostart and not runtime.lifecycle.ready_now(service):
        return _loading_stream(runtime, service, outgoing, exchange, watcher, deadline, label,
                               environ.get("PATH_INFO", ""), meter)
    try:
        admission = _admit(runtime, service, exchange, deadline)
    except BaseException:
        _close_exchange(exchange, watcher)
        raise
    if admission is None:
        _close_exchange(exchange, watcher)
        meter.finished(client_gone=True)
        return Response(status=499)  # the client left while waiting; nobody reads this
    try:
        upstream = _send(runtime, service, outgoing, exchange, label)
    except BaseException:
        admission.release()
        _close_exchange(exchange, watcher)
        raise
    if upstream is None:
        admission.release()
        _close_exchange(exchange, watcher)
        meter.finished(client_gone=True)
        return Response(status=499)

    headers_out = response_headers(upstream.raw.headers.items(), upstream.headers.get("Connection"),
                                   chunked=upstream.raw.chunked)
    content_type = upstream.headers.get("Content-Type", "")
    event_stream = content_type.startswith("text/event-stream")
    meter.answered(upstream.status_code, content_type, upstream.headers.get("Content-Encoding"))
    response = Response(_relay_body(upstream, exchange, label, meter, event_stream),
                        status=f"{upstream.status_code} {upstream.reason}", headers=headers_out)
    # Cleanup on close, not in the generator: a HEAD answer is never iterated. (Not
    # direct_passthrough: werkzeug would then hand over the bare generator and never call
    # these close callbacks.)
    response.call_on_close(lambda: _finish(upstream, exchange, watcher, admission, meter))
    if "Content-Type" not in upstream.headers:
        del response.headers["Content-Type"]  # werkzeug would add text/html otherwise
    elif event_stream:
        response.headers["X-Accel-Buffering"] = "no"  # so an nginx in front does not buffer
    exchange.responding = True
    return response


def _admit(runtime, service: ServiceConfig, exchange: Exchange, deadline: float):
    """Wait until the service can take the request and it has a slot. None: client left.
    The place in the queue is given back however the wait ends (the greenlet killed too)."""
    lifecycle, coordinator = runtime.lifecycle, runtime.coordinator
    client_here = lambda: not exchange.client_gone  # noqa: E731
    while True:
        try:
            lifecycle.ensure_ready(service, deadline, client_here)
        except ClientLeft:
            return None
        except ProxyError as error:
            record_rejected(service.id, _NOT_READY_REASONS.get(error.code, "start_failed"))
            raise
        admission = coordinator.admit(service.id, service.max_concurrent, service.max_queue)
        try:
            if admission.rejected:
                record_rejected(service.id, "queue_full")
                raise TooManyRequests(f"Service '{service.id}' has {service.max_concurrent} requests in flight and "
                                      f"{service.max_queue} waiting", service_id=service.id,
                                      hint="Retry later", headers={"Retry-After": "1"})
            if admission.queued and not _wait_in_queue(service, admission, exchange, deadline):
                admission.release()
                return None
        except BaseException:
            admission.release()
            raise
        # Counted in flight now; if a stop began meanwhile, step back and wait for it.
        if admission.phase != PHASE_STOPPING or not lifecycle.stopping(service.id):
            return admission
        admission.release()


def _wait_in_queue(service: ServiceConfig, admission, exchange: Exchange, deadline: float) -> bool:
    """Wait for a slot; False when the client left meanwhile."""
    exchange.on_cut = admission.cancel
    try:
        if admission.wait(deadline):
            return True
    finally:
        exchange.on_cut = None
    if exchange.client_gone:
        return False
    record_rejected(service.id, "queue_timeout")
    raise TooManyRequests(f"Service '{service.id}' had no free slot within {service.start_timeout:g} s",
                          service_id=service.id, headers={"Retry-After": "1"})


def _send(runtime, service: ServiceConfig, outgoing: Outgoing, exchange: Exchange, label: str):
    """Send upstream; the response once its headers are in, None if the client left."""
    upstream_host = service.upstream_host
    logger.debug("forward {} -> http://{}{}", label, upstream_host, outgoing.target.partition("?")[0])  # no query
    try:
        return runtime.upstream.send(outgoing.method, f"http://{upstream_host}{outgoing.target}", outgoing.headers,
                                     outgoing.body, (service.timeouts.connect, service.timeouts.read), exchange)
    except ProxyError:
        raise  # the client's body went over a limit or stalled: the upstream connection was dropped
    except (requests.RequestException, OSError) as exc:
        if exchange.client_gone:
            return None
        raise _upstream_error(service.id, upstream_host, exc) from None
    except MalformedBody as exc:  # gunicorn's reader of a chunked body met bytes that are not chunks
        raise InvalidRequest(f"The request body is malformed: {exc}", code="invalid_body",
                         service_id=service.id) from None


def _upstream_error(service_id: str, upstream_host: str, exc: Exception) -> ProxyError:
    if isinstance(exc, requests.ReadTimeout):
        record_upstream_error(service_id, "timeout")
        return UpstreamTimeout(f"Service '{service_id}' sent no response headers within its read timeout",
                               service_id=service_id, hint="Raise timeouts.read for slow prompts")
    logger.warning("service {} at {} did not answer: {}", service_id, upstream_host, exc)
    record_upstream_error(service_id, "unreachable")
    return UpstreamUnreachable(f"Service '{service_id}' did not answer at {upstream_host}",
                               service_id=service_id,
                               hint="The container runs but its server refused or dropped the connection; "
                                    "it may still be loading or may have crashed")


def _relay_body(upstream: requests.Response, exchange: Exchange, label: str, meter: RequestMeter,
                flush_headers: bool = False):
    """Hand each chunk on as it arrives.

    If the backend breaks off, end the client's connection without a clean end (no final
    chunk) so the client sees an incomplete response: raising ECONNRESET makes gunicorn
    close the socket quietly.

    For the metrics, the first chunk is timed, and references to the last three are kept
    (no copy, no look inside) for the token count once the body has ended.
    """
    raw = upstream.raw
    if flush_headers:
        yield b""  # gunicorn sends the headers now, as the backend did, not with the first event
    chunks = iter_body(upstream)
    older = previous = last = b""
    try:
        for last in chunks:  # the first chunk only
            meter.first_byte()
            if raw.connection is None:
                exchange.done = True
            yield last
            break
        for chunk in chunks:
            if raw.connection is None:
                # Read to the end: the connection is back in the pool, maybe already
                # serving another request, so a client leaving now must not cut it.
                exchange.done = True
            older, previous, last = previous, last, chunk
            yield chunk
        exchange.done = True
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if exchange.client_gone:
            return
        logger.warning("{}: backend broke off mid-response: {}", label, exc)
        meter.broken()
        raise ConnectionResetError(errno.ECONNRESET, "backend broke off mid-response") from None
    meter.body_end((older, previous, last))


def _close_exchange(exchange: Exchange, watcher) -> None:
    exchange.done = True
    exchange.connection = None
    stop_watching(watcher)


def _finish(upstream: requests.Response | None, exchange: Exchange, watcher, admission,
            meter: RequestMeter) -> None:
    """Runs when the WSGI server closes the response, whatever happened: the connection
    goes back to the pool when the body was read to its end, else it is closed. (While
    waiting for a start, there may be no upstream or admission yet.)"""
    _close_exchange(exchange, watcher)
    if upstream is not None:
        upstream.close()
    if admission is not None:
        admission.release()
    meter.finished(exchange.client_gone)


def _loading_stream(runtime, service: ServiceConfig, outgoing: Outgoing, exchange: Exchange, watcher,
                    deadline: float, label: str, path: str, meter: RequestMeter) -> Response:
    """Answer an event stream at once and keep it alive while the service starts; then
    relay the backend's events. Errors after that point can only be events themselves."""
    def events():
        waiter = gevent.spawn(_admit, runtime, service, exchange, deadline)
        admission = upstream = None
        try:
            yield _waiting(runtime, service)  # at once: the client sees its request is taken
            while not waiter.ready():
                waiter.join(_LOADING_EVERY)
                if not waiter.ready():
                    yield _waiting(runtime, service)
            try:
                admission = waiter.get()
                if admission is None:
                    return
                upstream = _send(runtime, service, outgoing, exchange, label)
            except ProxyError as error:
                meter.refusing(error.status)
                yield _error_event(answer(error, path))  # as the error handler would answer it
                return
            if upstream is None:
                return
            meter.answered(upstream.status_code, upstream.headers.get("Content-Type", ""),
                           upstream.headers.get("Content-Encoding"))
            if upstream.status_code >= 400:
                body = upstream.raw.read(decode_content=True)
                yield _error_event(_json_or_text(body, upstream.status_code))
                return
            yield from _relay_body(upstream, exchange, label, meter)
        finally:
            waiter.kill(block=False)  # stops our waiting only: a start under way goes on
            _finish(upstream, exchange, watcher, admission, meter)

    response = Response(events(), status=200, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    exchange.responding = True
    return response


def _waiting(runtime, service: ServiceConfig) -> bytes:
    """The keep-alive comment while a stream waits: how far the image pull has come, or loading."""
    progress = runtime.lifecycle.status(service, probe_health=False).progress
    return _LOADING if progress is None else pulling_comment(service.image, progress)


def pulling_comment(image: str, progress: dict) -> bytes:
    """``: pulling <image> 45% (1.2 of 2.7 GB)``; before a size is known, the layers."""
    text = f": pulling {image}"
    if progress["percent"] is not None:
        unit, name = (1e9, "GB") if progress["bytes_total"] >= 1e9 else (1e6, "MB")
        text += (f" {progress['percent']:.0f}% ({progress['bytes_done'] / unit:.1f} of "
                 f"{progress['bytes_total'] / unit:.1f} {name})")
    elif progress["layers_total"]:
        text += f" ({progress['layers_done']} of {progress['layers_total']} layers)"
    return text.encode() + b"\n\n"


def _error_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _json_or_text(body: bytes, status: int) -> dict:
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and "error" in parsed:
            return parsed
    except ValueError:
        pass
    return {"error": {"message": body.decode(errors="replace")[:2000], "code": status, "source": "backend"}}
