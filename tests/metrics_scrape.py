"""Helpers for the metrics tests: scrape ``/metrics`` as Prometheus would parse it, read
samples, and talk to the stand-in backend the way a client does."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

CLOSE = {"Connection": "close"}  # each scrape on a new connection, so any worker may answer
MESSAGES = [{"role": "user", "content": "count to three please"}]


def scrape(proxy, headers: dict | None = None) -> dict:
    """Every sample of one scrape, {(sample name, sorted labels): value}; the exposition
    must parse and declare each family once."""
    answer = requests.get(f"{proxy.url}/metrics", headers={**CLOSE, **(headers or {})}, timeout=15)
    assert answer.status_code == 200, answer.text[:500]
    assert answer.headers["Content-Type"].startswith("text/plain"), answer.headers["Content-Type"]
    families = list(text_string_to_metric_families(answer.text))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), f"a family is declared twice: {sorted(names)}"
    types = [line.split()[2] for line in answer.text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a TYPE line is repeated"
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in families for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def worker_pids(proxy) -> set[int]:
    """The gunicorn master's children: its workers."""
    pid = proxy.proc.pid
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def chat(url: str, *, stream: bool = False, include_usage: bool = False, max_tokens: int = 3,
         model: str | None = None) -> tuple[dict | None, dict | None]:
    """One chat completion; the (usage, timings) its answer carried, as the client saw them."""
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "stream": stream}
    if model:
        body["model"] = model
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    answer = requests.post(url, json=body, headers=CLOSE, stream=stream, timeout=30)
    assert answer.status_code == 200, answer.text[:300]
    if not stream:
        payload = answer.json()
        return payload.get("usage"), payload.get("timings")
    usage = timings = None
    for line in answer.iter_lines():
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
    return usage, timings


def expected_tokens(usage: dict | None, timings: dict | None) -> tuple[int, int]:
    """(prompt, completion) as documented: usage when the answer had it, else timings."""
    if usage:
        return usage["prompt_tokens"], usage["completion_tokens"]
    return timings["prompt_n"] + timings["cache_n"], timings["predicted_n"]


def hold(proxy, path: str) -> socket.socket:
    """Send a request and leave it waiting for its answer; close the socket to leave."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock
