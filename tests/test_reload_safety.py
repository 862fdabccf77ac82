"""A config file that has become invalid never takes a running proxy down.

gunicorn runs ``gunicorn.conf.py`` again on SIGHUP, and forks new workers after it (and
whenever a worker dies). Real gunicorn here, with a backend process behind service 'llm':
the file is broken under the running proxy, then the proxy is signalled or loses a worker.
"""
from __future__ import annotations

import os
import queue
import signal
from concurrent.futures import ThreadPoolExecutor

import requests
import yaml

from conftest import wait_until
from test_faults import assert_complete, read_sse, worker_pids

STREAM_EVENTS = 40
BROKEN_PORT = 70000


def _break(proxy) -> str:
    """Write an invalid port into the config file; the problem line the proxy must log."""
    config = yaml.safe_load(proxy.config_path.read_text())
    config["services"]["llm"]["port"] = BROKEN_PORT
    proxy.config_path.write_text(yaml.safe_dump(config))
    return (f"{proxy.config_path}: services.llm.port: Must be greater than or equal to 1 and less than "
            "or equal to 65535.")


def _model_ids(proxy) -> list[str]:
    answer = requests.get(f"{proxy.url}/v1/models", headers={"Connection": "close"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return [model["id"] for model in answer.json()["data"]]


def _served(proxy) -> None:
    for _ in range(10):
        answer = requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10)
        assert answer.status_code == 200, answer.text


def test_a_reload_with_a_broken_config_keeps_serving_and_a_fixed_one_applies(backend, start_proxy):
    proxy = start_proxy({"llm": {"type": "llama-cpp-server", "image": "unused", "port": backend.port}},
                        workers=2, env={"PROXY_GRACEFUL_TIMEOUT": "60"}, log_level="INFO")
    good = yaml.safe_load(proxy.config_path.read_text())
    old_workers = worker_pids(proxy)
    with ThreadPoolExecutor(1) as pool:
        first_event = queue.Queue()
        stream = pool.submit(read_sse, f"{proxy.url}/service/llm/stream", {"events": STREAM_EVENTS, "delay": 0.1},
                             lambda: first_event.put(1), 60)
        first_event.get(timeout=15)  # mid-stream from here on
        problem = _break(proxy)
        proxy.proc.send_signal(signal.SIGHUP)

        wait_until(lambda: problem in proxy.log(), timeout=15, what="the reload to log the problem")
        wait_until(lambda: worker_pids(proxy) - old_workers, timeout=15, what="new workers after SIGHUP")
        _served(proxy)
        assert not stream.done(), "the stream ended before the reload was over: it proves nothing"
        assert_complete(stream.result(timeout=60), STREAM_EVENTS)

    assert proxy.proc.poll() is None, proxy.log()
    assert "configuration rejected on reload, the previous one stays in force" in proxy.log()
    wait_until(lambda: not (worker_pids(proxy) & old_workers), timeout=20, what="the old workers to exit")
    _served(proxy)  # by the workers forked after the bad reload

    # The file fixed, with a change: the next reload applies it.
    good["services"]["llm"]["aliases"] = ["renamed:1"]
    proxy.config_path.write_text(yaml.safe_dump(good))
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "renamed:1" in _model_ids(proxy), timeout=20, what="the fixed config to apply")
    assert "configuration reloaded from" in proxy.log()
    assert proxy.proc.poll() is None
    _served(proxy)


def test_a_worker_replaced_while_the_file_is_broken_serves_the_accepted_config(backend, start_proxy):
    """Not only a reload forks workers: one that dies is replaced, and the new one must not
    read the broken file (a worker that fails to boot makes gunicorn halt)."""
    proxy = start_proxy({"llm": {"type": "llama-cpp-server", "image": "unused", "port": backend.port}},
                        workers=1, log_level="INFO")
    _break(proxy)
    (old_worker,) = worker_pids(proxy)
    os.kill(old_worker, signal.SIGKILL)
    wait_until(lambda: worker_pids(proxy) - {old_worker}, timeout=15, what="a new worker")
    wait_until(lambda: _answers(proxy), timeout=15, what="the new worker to serve")
    _served(proxy)
    assert _model_ids(proxy) == ["llm"]
    assert proxy.proc.poll() is None, proxy.log()


def _answers(proxy) -> bool:
    try:
        return requests.get(f"{proxy.url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False
