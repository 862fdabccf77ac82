"""The live event feed behind ``GET /api/v1/events``: what changed, as it changes.

One watcher greenlet per worker, started with the first subscriber and ended with the
last, looks at every service four times a second through what the worker already knows
(``Lifecycle.status(probe_health=False)``: the events-fed container states and the shared
coordinator, never a Docker call) and compares it with its previous look. A change is
encoded once and offered to each subscriber's bounded queue, so a subscriber costs one
greenlet waiting on its queue and nothing per tick. A subscriber whose queue is full has
stopped reading: it is dropped (and its connection cut) rather than buffered without bound.

Whatever made the change (this worker, another one, the idle sweep, a group swap, the
``docker`` CLI, a crash) it shows here within a tick, since every worker sees the same
Docker events and the same shared memory. A container that runs but was never marked
healthy by a start of ours (started with the docker CLI, adopted after a restart) is probed
at most once a second, so it moves on to ``ready``.
"""
from __future__ import annotations

import json
import time
import weakref
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

import gevent
from gevent.queue import Empty, Full, Queue
from loguru import logger

from ..config import ServiceConfig
from .states import STARTING

TICK = 0.25             # seconds between looks
PROGRESS_EVERY = 1.0    # at most one progress-only event per service this often
PROBE_EVERY = 1.0       # at most one health probe per service this often
KEEP_ALIVE_EVERY = 15.0  # seconds of silence before a keep-alive comment
QUEUE_SIZE = 256        # events a subscriber may be behind before it is dropped
KEEP_ALIVE = b": keep-alive\n\n"

# (state, reason, Docker's status, progress, exit code, OOM-killed): what a subscriber is told about
Key = tuple


def encode(kind: str, data: dict) -> bytes:
    """One Server-Sent Event."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def key_of(fields: dict) -> Key:
    """The part of a service's status whose change is an event (from a status report or an
    event's fields)."""
    progress = fields.get("progress")
    return (fields["state"], fields["reason"], fields["status"],
            tuple(sorted(progress.items())) if progress else None, fields.get("exit_code"), fields.get("oom_killed"))


class Subscription:
    """One client of the feed: a bounded queue of encoded events, read by its response."""

    def __init__(self, on_drop: Callable[[], None] | None = None):
        self._queue: Queue = Queue(QUEUE_SIZE)
        self._on_drop = on_drop
        self.seen: dict[str, Key] = {}  # what this client was last told, per service
        self.closed = False

    def remember(self, reports: Iterable[dict]) -> None:
        """The snapshot this client got: changes already in it are not sent again."""
        self.seen = {report["service_id"]: key_of(report) for report in reports}

    def offer(self, item: tuple) -> bool:
        """Queue (service id or None, key, event bytes); False when the queue is full."""
        try:
            self._queue.put_nowait(item)
            return True
        except Full:
            return False

    def events(self) -> Iterator[bytes]:
        """The encoded events, with a keep-alive comment after each silence, until closed."""
        while not self.closed:
            try:
                item = self._queue.get(timeout=KEEP_ALIVE_EVERY)
            except Empty:
                yield KEEP_ALIVE
                continue
            if item is None:  # closed
                return
            service_id, key, data = item
            if service_id is not None:
                if self.seen.get(service_id) == key:
                    continue  # the snapshot said so already
                self.seen[service_id] = key
            yield data

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._queue.put_nowait(None)  # wake a reader waiting on the queue
        except Full:
            pass  # the reader is busy writing: it sees `closed` next

    def drop(self) -> None:
        self.close()
        if self._on_drop is not None:
            self._on_drop()


class EventFeed:
    """The feed of one worker (see the module docstring)."""

    def __init__(self, lifecycle):
        self.lifecycle = lifecycle
        self._subscribers: dict[Subscription, None] = {}  # in the order they came
        self._watcher: gevent.Greenlet | None = None
        self._last: dict[str, Key] = {}
        self._emitted_at: dict[str, float] = {}
        self._probed_at: dict[str, float] = {}
        self._probing: dict[str, gevent.Greenlet] = {}
        _feeds.add(self)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self, on_drop: Callable[[], None] | None = None) -> Subscription:
        """A new subscriber; every change from now on is offered to it. ``on_drop`` cuts its
        connection if it stops reading."""
        subscription = Subscription(on_drop)
        if self._watcher is None:
            # Look before the caller takes its snapshot: any change after this look is sent.
            self._last = {service.id: self._look(service)[0] for service in self._services()}
            self._watcher = gevent.spawn(self._run)
        self._subscribers[subscription] = None
        logger.debug("event feed: a subscriber came ({} now)", len(self._subscribers))
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()
        if self._subscribers.pop(subscription, 0) is None:
            logger.debug("event feed: a subscriber left ({} now)", len(self._subscribers))

    def close(self) -> None:
        """End every subscription (the worker is going)."""
        for subscription in list(self._subscribers):
            self.unsubscribe(subscription)

    def publish(self, service_id: str | None, key: Key | None, data: bytes) -> None:
        for subscription in list(self._subscribers):
            if not subscription.offer((service_id, key, data)):
                logger.warning("event feed: a subscriber stopped reading ({} events behind); dropping it",
                               QUEUE_SIZE)
                self._subscribers.pop(subscription, None)
                subscription.drop()

    # -- the watcher ------------------------------------------------------------------------

    def _services(self) -> list[ServiceConfig]:
        return list(self.lifecycle.config.services.values())  # read each time: a reload may change them

    def _run(self) -> None:
        try:
            while self._subscribers:
                gevent.sleep(TICK)
                try:
                    self._tick()
                except Exception:  # noqa: BLE001 - the feed must outlive one bad look
                    logger.exception("event feed: looking at the services failed; looking again")
        finally:
            self._watcher = None

    def _tick(self) -> None:
        now = time.monotonic()
        services = self._services()
        for service in services:
            key, fields, status = self._look(service)
            self._maybe_probe(service, status, now)
            previous = self._last.get(service.id)
            if key == previous:
                continue
            if previous is not None and key[:3] == previous[:3] and key[4:] == previous[4:] \
                    and now - self._emitted_at.get(service.id, 0.0) < PROGRESS_EVERY:
                continue  # only the progress moved, and it was told less than a second ago
            self._last[service.id] = key
            self._emitted_at[service.id] = now
            self.publish(service.id, key, encode("service", fields))
        for gone in set(self._last) - {service.id for service in services}:
            del self._last[gone]

    def _look(self, service: ServiceConfig):
        status = self.lifecycle.status(service, probe_health=False)
        info = status.container
        fields = {"service_id": service.id, "state": status.state, "status": info.status,
                  "reason": status.reason, "progress": status.progress, "time": utc_now(),
                  "exit_code": info.exit_code, "oom_killed": info.oom_killed}
        key = key_of(fields)
        if info.status not in ("exited", "dead"):  # exit code and OOM are news only with an exit
            del fields["exit_code"], fields["oom_killed"]
        return key, fields, status

    def _maybe_probe(self, service: ServiceConfig, status, now: float) -> None:
        """Mark a running container healthy when no start of ours will (see the module docstring)."""
        if status.state != STARTING or not status.container.running:
            return
        if service.id in self._probing or now - self._probed_at.get(service.id, 0.0) < PROBE_EVERY:
            return
        self._probed_at[service.id] = now
        probe = gevent.spawn(self.lifecycle.check_health, service)  # a slow backend must not hold the tick up
        self._probing[service.id] = probe
        probe.link(lambda _: self._probing.pop(service.id, None))


_feeds: "weakref.WeakSet[EventFeed]" = weakref.WeakSet()


def publish_reload(added: Iterable[str], removed: Iterable[str], restarted: Iterable[str],
                   updated: Iterable[str]) -> None:
    """Tell every subscriber of this process that the config was reloaded: the service ids
    added, removed, restarted (their container was replaced) and updated (changed without a
    restart). Call it in each worker that applied the reload."""
    data = encode("reload", {"added": list(added), "removed": list(removed), "restarted": list(restarted),
                             "updated": list(updated), "time": utc_now()})
    for feed in list(_feeds):
        feed.publish(None, None, data)
