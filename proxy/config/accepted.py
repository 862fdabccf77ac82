"""The config the gunicorn master accepted last: the one its workers serve, and the one a
reload keeps when the file has become invalid.

``gunicorn.conf.py`` runs in the master at start and again on every SIGHUP, and records
here each config it accepts. Workers are forked from the master, so they find it here too,
and ``create_app`` serves it rather than reading the file again: a file that broke after the
master's last load never reaches a worker (a worker failing to boot on it would make
gunicorn halt, cutting every stream). Outside gunicorn nothing is recorded, and the file is
read as usual.
"""
from __future__ import annotations

from .model import Config

_accepted: Config | None = None
_previous: Config | None = None


def accept(config: Config) -> None:
    global _accepted, _previous
    if _accepted is not None and config is not _accepted:
        _previous = _accepted
    _accepted = config


def accepted() -> Config | None:
    """The config last accepted in this process or the master it was forked from."""
    return _accepted


def previous() -> Config | None:
    """The config accepted before the last one (a SIGHUP reload happened), or None."""
    return _previous
