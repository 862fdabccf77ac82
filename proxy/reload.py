"""Change the config without a restart. Each worker watches the file (``watch_config``),
and reloads when it changed and has stopped changing, when the admin API asks (in any
worker), and, through the gunicorn master, on SIGHUP. A new file is validated exactly as at
start-up; a bad one changes nothing. A good one is applied per service with the least
disturbance: every worker switches its routing and limits, and one of them (the first to
claim the new config in the coordinator) brings the containers in line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import gevent
from loguru import logger

from .config import Config, ConfigError, load_config_text
from .config.diff import ConfigChange, diff
from .config.model import text_digest
from .log import setup_logging
from .metrics.families import declare
from .routes import install_policies
from .services.feed import publish_reload

_CHECK_EVERY = 1.0  # seconds between looks at the file (a change is applied within two)


@dataclass(frozen=True)
class Outcome:
    change: ConfigChange | None = None  # None: nothing new (the same file, or a rejected one)
    problems: tuple[str, ...] = ()      # the rejected file's problems, one a line


class Reloader:
    def __init__(self, app, path: str):
        self.app = app
        self.path = path
        # What this worker serves; a worker forked late may find the file changed already,
        # and then looks at it as at a change (it has not seen this file).
        self._applied = self._runtime.config.digest
        self._seen = self._stat() if self._file_digest() == self._applied else None
        self._settling = None  # a stat that differs from the last seen one, seen once
        self._rejected = None
        self._requests = self._runtime.coordinator.reload_requests()
        self._loop = None

    @property
    def _runtime(self):
        return self.app.extensions["proxy"]

    def start(self) -> None:
        self._loop = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.kill(block=False)

    def reload(self) -> Outcome:
        """Read, check and apply the file now."""
        try:
            text = self._read()
        except (OSError, UnicodeDecodeError) as exc:
            return self._reject(None, [f"{self.path}: cannot read config: {getattr(exc, 'strerror', None) or exc}"])
        digest = text_digest(text)
        if digest == self._applied:
            return Outcome()
        try:
            config = load_config_text(text, source=self.path)
        except ConfigError as error:
            return self._reject(digest, error.errors)
        return Outcome(change=self.apply(config, digest))

    def apply(self, new: Config, digest: int) -> ConfigChange:
        runtime = self._runtime
        old = runtime.config
        change = diff(old, new)
        runtime.reconfigure(new)
        setup_logging(new.server.log_level, new.secrets)
        declare(new)  # the new services' series at zero
        install_policies(self.app, new)  # tokens, keys, hosts, origins, body deadline, log level
        self._applied, self._rejected = digest, None
        if not change.empty:
            logger.info("configuration reloaded from {}: {}", self.path,
                        ", ".join(f"{kind} {', '.join(ids)}" for kind, ids in change.to_dict().items() if ids))
        if not change.empty:  # every worker tells its own subscribers of the event feed
            publish_reload(change.added, change.removed, change.restarted, change.updated)
        if change.needs_restart:
            logger.warning("configuration reload: {} change(s) only with a restart of the proxy",
                           ", ".join(f"server.{name}" for name in change.needs_restart))
        if runtime.coordinator.claim_config(digest):
            from .services.reconcile import reconcile
            gevent.spawn(reconcile, runtime.lifecycle, old, new, change)
        return change

    def catch_up(self, previous: Config) -> None:
        """In a worker the gunicorn master forked after a SIGHUP reload: bring the
        containers in line with the config it accepted (one worker does it)."""
        runtime = self._runtime
        change = diff(previous, runtime.config)
        if not change.empty and runtime.coordinator.claim_config(self._applied):
            from .services.reconcile import reconcile
            gevent.spawn(reconcile, runtime.lifecycle, previous, runtime.config, change)

    def _reject(self, digest: int | None, problems: list[str]) -> Outcome:
        if digest is None or digest != self._rejected:  # each bad file is logged once per worker
            logger.error("configuration reload rejected, the running one stays in force: {}", self.path)
            for problem in problems:
                logger.error("{}", problem)
        self._rejected = digest
        return Outcome(problems=tuple(problems))

    def _run(self) -> None:
        while True:
            gevent.sleep(_CHECK_EVERY)
            try:
                self._check()
            except Exception:  # noqa: BLE001 - the watch must outlive any one failed reload
                logger.exception("configuration reload failed")

    def _check(self) -> None:
        requests = self._runtime.coordinator.reload_requests()
        if requests != self._requests:  # asked through the admin API, maybe in another worker
            self._requests = requests
            self.reload()
            return
        if not self._runtime.config.server.watch_config:
            return
        seen = self._stat()
        if seen == self._seen:
            self._settling = None
        elif seen == self._settling:  # changed, then unchanged for a whole look: written
            self._seen, self._settling = seen, None
            self.reload()
        else:
            self._settling = seen

    def _stat(self):
        try:
            found = os.stat(self.path)
        except OSError:
            return None
        return found.st_ino, found.st_size, found.st_mtime_ns

    def _file_digest(self) -> int | None:
        try:
            return text_digest(self._read())
        except (OSError, UnicodeDecodeError):
            return None

    def _read(self) -> str:
        with open(self.path, encoding="utf-8-sig") as file:
            return file.read()

