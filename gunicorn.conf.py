"""gunicorn settings for the proxy: ``gunicorn -c gunicorn.conf.py wsgi:app``.

The config is checked here, in the master, before any worker forks: a bad config ends
start-up with exit status 1 and its messages, instead of gunicorn looping on workers that
fail to boot. gunicorn runs this file again on SIGHUP: a config that has become invalid
by then is logged and the previous one kept, since exiting would cut every stream. Workers
serve the config accepted here, never the file itself (``proxy.config.accepted``).
Settings: gevent workers, no preload, a long graceful timeout for in-flight streams, the
control socket off. The master also makes the directory the workers' metrics are merged
from, and forgets a dead worker's live gauges there.
"""
import os
import sys

from loguru import logger

from proxy.config import ConfigError, config_path, load_config
from proxy.config.accepted import accept, accepted
from proxy.shared.coordinator import ensure_installed
from proxy.log import GunicornLogger, setup_logging
from proxy.metrics import multiproc  # imports no prometheus_client: its directory comes first

_path = config_path()
_previous = accepted()  # set when this file already ran in this master: this is a reload
try:
    _config = load_config(_path)
except ConfigError as _error:
    if _previous is None:  # the first start: nothing to serve yet
        setup_logging("INFO")
        logger.error("configuration rejected: {}", _path)
        print(_error, file=sys.stderr)
        sys.exit(1)
    logger.error("configuration rejected on reload, the previous one stays in force: {}", _path)
    for _problem in _error.errors:
        logger.error("{}", _problem)
    _config = _previous
else:
    setup_logging(_config.server.log_level, _config.secrets)
    logger.info("configuration {} from {}: {} service(s)", "reloaded" if _previous else "loaded", _path,
                len(_config.services))
accept(_config)  # what the workers forked from now on serve
os.environ["PROXY_CONFIG"] = os.path.abspath(_path)  # a reload reads the same file

_host = _config.server.host
bind = [f"[{_host}]:{_config.server.port}" if ":" in _host else f"{_host}:{_config.server.port}"]
worker_class = "gevent"
workers = int(os.environ.get("PROXY_WORKERS", "2"))
# Requests in flight, queues and swap locks that every worker must agree on: shared memory
# made here, in the master, so the forked workers inherit it (kept across SIGHUP reloads).
ensure_installed(list(_config.services), list(_config.groups), max_workers=max(64, 4 * workers))
# Metrics every worker adds to (prometheus_client's multiprocess mode): a fresh private
# directory per run, in the environment before a worker imports prometheus_client.
multiproc.prepare_directory()
worker_connections = int(os.environ.get("PROXY_WORKER_CONNECTIONS", "4096"))  # streams per worker
preload_app = False           # objects made before gevent patches would block its loop
timeout = 30                  # a heartbeat for gevent workers, not a request limit
graceful_timeout = int(os.environ.get("PROXY_GRACEFUL_TIMEOUT", "900"))  # in-flight generations finish
keepalive = 5                 # idle keep-alive connections also hold up a graceful stop
backlog = 4096
control_socket_disable = True  # else gunicorn makes a socket under $HOME
logger_class = GunicornLogger
loglevel = _config.server.log_level.lower()
accesslog = None               # requests are logged by the app at DEBUG
# X-Forwarded-Proto and friends count only from the front proxies named in
# server.trusted_proxies (gunicorn's default trusts any local client). No header may set
# SCRIPT_NAME or PATH_INFO, whoever sends it: the proxy serves at the root, routes on the
# raw path, and gunicorn answers a path outside a claimed SCRIPT_NAME with a bare 500.
forwarded_allow_ips = ",".join(_config.server.trusted_proxies)
forwarder_headers = ""


def on_starting(server):
    logger.info("inference proxy starting on {} with {} worker(s)", ", ".join(bind), workers)


def child_exit(server, worker):
    multiproc.worker_exited(worker.pid)  # its counts stay; its live gauges go


def on_exit(server):
    multiproc.remove_directory()
    logger.info("inference proxy stopped")


def worker_exit(server, worker):
    # End the worker's background loops (the Docker events stream, the heartbeat, the idle
    # sweep) and its pooled backend connections before it goes.
    app = getattr(worker, "wsgi", None)
    runtime = getattr(app, "extensions", {}).get("proxy") if app is not None else None
    if runtime is not None:
        runtime.close()
