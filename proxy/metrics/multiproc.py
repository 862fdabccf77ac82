"""The directory where gunicorn's workers keep their counts (prometheus_client's
multiprocess mode).

``prometheus_client`` picks its storage when it is first imported: with
``PROMETHEUS_MULTIPROC_DIR`` set, every process writes its own files there and a scrape
merges them, so any worker's answer covers all workers, and a dead worker's counts stay.
The gunicorn master sets it (``prepare_directory``) before any worker forks: a fresh,
private directory per run of the proxy, so nothing from an earlier run leaks in. A reload
(SIGHUP runs gunicorn.conf.py again) keeps it. Without gunicorn it is never set, and
``prometheus_client`` keeps its counts in memory (one process).

This module imports no ``prometheus_client`` at import time, on purpose.
"""
from __future__ import annotations

import os
import shutil
import tempfile

ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"

_made: tuple[int, str] | None = None  # (pid of the master, directory) once made


def prepare_directory() -> str:
    """In the gunicorn master: make the run's directory and point the environment at it.

    Whatever ``PROMETHEUS_MULTIPROC_DIR`` the proxy was started with is replaced: an
    inherited directory may hold another run's counts.
    """
    global _made
    if _made is not None and _made[0] == os.getpid() and os.path.isdir(_made[1]):
        path = _made[1]  # a reload re-runs the config file: keep counting in the same place
    else:
        path = tempfile.mkdtemp(prefix="inference-proxy-metrics-")  # mode 0700: ours only
        _made = (os.getpid(), path)
    os.environ[ENVIRONMENT] = path
    return path


def enabled() -> bool:
    """Whether this process shares its counts through a directory (under gunicorn)."""
    return bool(os.environ.get(ENVIRONMENT))


def worker_exited(pid: int) -> None:
    """gunicorn's ``child_exit``: forget the live gauges of a worker that is gone (its
    counters and histograms stay, merged into every scrape)."""
    if enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def remove_directory() -> None:
    """gunicorn's ``on_exit``: the run is over, its counts go with it."""
    if _made is not None and _made[0] == os.getpid():
        shutil.rmtree(_made[1], ignore_errors=True)
