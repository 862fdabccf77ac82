"""One forwarded request's recordings, made as it goes through the relay.

Everything here runs a few times per request, never per chunk: at the answer's headers,
at its first body byte, once its body has ended (the token count, from the bytes the relay
kept), and when the response is closed. The request is counted exactly once, either when
the proxy refuses it (``refused``) or when its response is closed (``finished``).
"""
from __future__ import annotations

import time

from . import families
from .usage import read_usage

_JSON = "application/json"
_EVENT_STREAM = "text/event-stream"


class RequestMeter:
    __slots__ = ("service_id", "route", "started", "status", "from_backend", "body_started", "body_ended",
                 "usage_at_end")

    def __init__(self, service_id: str, route: str, started: float | None = None):
        self.service_id = service_id
        self.route = route
        self.started = time.monotonic() if started is None else started  # when the request came in
        self.status = 0  # the status answered; 0 until there is one
        self.from_backend = False
        self.body_started = False
        self.body_ended = False
        self.usage_at_end = False

    def refused(self, status: int) -> None:
        """The proxy answered with an error of its own (its envelope): count it now."""
        families.count_request(self.service_id, self.route, status)

    def refusing(self, status: int) -> None:
        """As ``refused``, for an error that is sent inside a response already under way
        (an event of a loading stream): counted when that response is closed."""
        self.status = status

    def answered(self, status: int, content_type: str, content_encoding: str | None) -> None:
        """The backend's response headers are in. Its body is read for tokens at its end
        when it can carry them: an event stream, or plain (not compressed) JSON."""
        self.status = status
        self.from_backend = True
        self.usage_at_end = content_type.startswith(_EVENT_STREAM) or (
            content_type.startswith(_JSON) and content_encoding in (None, "", "identity"))

    def first_byte(self) -> None:
        self.body_started = True
        families.observe_first_byte(self.service_id, time.monotonic() - self.started)

    def body_end(self, last_chunks: tuple[bytes, ...]) -> None:
        """The backend's body ended cleanly; ``last_chunks``: its last few, in order."""
        self.body_ended = True
        if self.usage_at_end:
            usage = read_usage(b"".join(last_chunks))
            if usage.prompt is not None or usage.completion is not None:
                families.record_tokens(self.service_id, usage.prompt or 0, usage.completion or 0)
            if usage.per_second is not None:
                families.observe_tokens_per_second(self.service_id, usage.per_second)

    def broken(self) -> None:
        """The backend broke off mid-body."""
        self.body_ended = True
        families.record_upstream_error(self.service_id, "broken_stream")

    def finished(self, client_gone: bool) -> None:
        """The response is closed, whatever happened: count the request and its time."""
        families.count_request(self.service_id, self.route, self.status or 499)
        if self.from_backend:
            families.observe_duration(self.service_id, time.monotonic() - self.started)
        # A body that began and neither ended nor broke was stopped by the client leaving.
        if client_gone or (self.body_started and not self.body_ended):
            families.record_client_disconnect(self.service_id)
