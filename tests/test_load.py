"""Load: 1,000 concurrent streams through one worker, byte for byte; 500 slow or idle
connections (slowloris), and 100 clients that never read, none of which may keep other
clients waiting.

Marked ``slow`` (CI still runs them). The 1,000 streams are read by a gevent client in a
separate process (this file run as a script, see ``_client_main``), so the test process's
own threads and GIL cannot be what limits the proxy. Everything is on 127.0.0.1, bounded
in time, and only this test's processes are stopped (by PID, through the fixtures).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MB = 1024 * 1024


def raise_fd_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (children, such as the proxy and the
    backend, inherit it); fail plainly when even that is below what the test needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        soft = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise RuntimeError(f"RLIMIT_NOFILE is {soft} (hard limit {hard}); this needs {needed} file descriptors")


# -- the load client (this file run as a script) --------------------------------------------------

def _client_main(spec_path: str, out_path: str) -> None:
    """Open every stream of the spec at once (staggered by a few ms), read each to its end
    and write one result per stream: status, length, sha256, whether the body ended
    cleanly, when it started and ended. gevent sockets, no monkey-patching."""
    import http.client

    import gevent
    import gevent.socket

    spec = json.loads(Path(spec_path).read_text())
    raise_fd_limit(len(spec["streams"]) + 100)

    def fetch(index: int, stream: dict) -> dict:
        result = {"index": index, "target": stream["target"], "status": None, "bytes": 0, "sha256": None,
                  "header_sha256": None, "complete": False, "error": None, "started": time.time(),
                  "first_byte": None, "ended": None}
        digest = hashlib.sha256()
        sock = None
        try:
            sock = gevent.socket.create_connection(("127.0.0.1", stream["port"]), timeout=spec["gap_timeout"])
            sock.sendall(f"GET {stream['path']} HTTP/1.1\r\nHost: 127.0.0.1:{stream['port']}\r\n"
                         f"Connection: close\r\n\r\n".encode())
            response = http.client.HTTPResponse(sock)
            response.begin()
            result["status"] = response.status
            result["header_sha256"] = response.getheader("X-Body-Sha256")
            result["first_byte"] = time.time()
            while True:
                data = response.read1(65536)  # raises IncompleteRead if the body is cut short
                if not data:
                    break
                digest.update(data)
                result["bytes"] += len(data)
            result["complete"] = True
        except Exception as exc:  # noqa: BLE001 - every failure is a result to report
            result["error"] = repr(exc)
        finally:
            result["ended"] = time.time()
            result["sha256"] = digest.hexdigest()
            if sock is not None:
                sock.close()
        return result

    greenlets = []
    for index, stream in enumerate(spec["streams"]):
        greenlets.append(gevent.spawn(fetch, index, stream))
        gevent.sleep(spec["stagger"])
    gevent.joinall(greenlets, timeout=spec["deadline"])
    results = [g.value if g.successful() else {"index": i, "error": "did not finish before the deadline"}
               for i, g in enumerate(greenlets)]
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _client_main(sys.argv[1], sys.argv[2])
    sys.exit(0)


# -- the tests ----------------------------------------------------------------------------------

import pytest  # noqa: E402 - after the client, which needs none of this
import requests  # noqa: E402

from conftest import service_entry, wait_until  # noqa: E402

pytestmark = pytest.mark.slow

STREAMS = 1000
VARIANTS = 10          # distinct parameter sets; each is also fetched directly from the backend
CHUNKS = 120
CHUNK_DELAY = 0.5      # seconds before each chunk: 120 chunks, about 60 s per stream


def _variant(k: int) -> str:
    chunk = 500 + 37 * k
    size = CHUNKS * chunk - 11 * k  # the last chunk is short for k > 0
    return f"/download?bytes={size}&chunk={chunk}&mode=chunked&delay={CHUNK_DELAY}"


def _worker_rss(proxy) -> int:
    master = proxy.proc.pid
    total = 0
    for pid in open(f"/proc/{master}/task/{master}/children").read().split():
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.timeout(300)
def test_a_thousand_concurrent_streams_through_one_worker_arrive_byte_identical(start_backend, start_proxy, tmp_path):
    raise_fd_limit(4 * STREAMS)
    backend = start_backend()
    proxy = start_proxy({"llm": service_entry(backend.port, timeouts={"connect": 5, "read": 30})},
                        workers=1, log_level="INFO")
    master = proxy.proc.pid
    assert len(open(f"/proc/{master}/task/{master}/children").read().split()) == 1
    rss_before = _worker_rss(proxy)

    streams = [{"target": "proxy", "port": proxy.port, "variant": i % VARIANTS,
                "path": "/service/llm" + _variant(i % VARIANTS)} for i in range(STREAMS)]
    streams += [{"target": "direct", "port": backend.port, "variant": k, "path": _variant(k)}
                for k in range(VARIANTS)]
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "results.json"
    spec_path.write_text(json.dumps({"streams": streams, "stagger": 0.002, "gap_timeout": 30,
                                     "deadline": CHUNKS * CHUNK_DELAY + 120}))

    client = subprocess.Popen([sys.executable, __file__, str(spec_path), str(out_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rss_peak = rss_before
    try:
        while client.poll() is None:  # sample the worker's memory while the streams run
            rss_peak = max(rss_peak, _worker_rss(proxy))
            try:
                client.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
    output = client.stdout.read().decode(errors="replace")
    assert client.returncode == 0, output
    results = json.loads(out_path.read_text())

    direct = {streams[r["index"]]["variant"]: r for r in results if streams[r["index"]]["target"] == "direct"}
    for k, result in direct.items():
        assert result["status"] == 200 and result["complete"], result
        assert result["sha256"] == result["header_sha256"], result
    proxied = [r for r in results if streams[r["index"]]["target"] == "proxy"]
    assert len(proxied) == STREAMS
    failed = [r for r in proxied if r.get("status") != 200 or not r.get("complete")]
    assert not failed, f"{len(failed)} streams failed, e.g. {failed[:3]}"
    different = [r for r in proxied if r["sha256"] != direct[streams[r["index"]]["variant"]]["sha256"]
                 or r["header_sha256"] != direct[streams[r["index"]]["variant"]]["header_sha256"]]
    assert not different, f"{len(different)} streams differ from the backend's bytes, e.g. {different[:3]}"

    # They really were concurrent: the last one started before the first one ended.
    last_start = max(r["first_byte"] for r in proxied)
    first_end = min(r["ended"] for r in proxied)
    assert last_start < first_end, (last_start, first_end)
    durations = sorted(r["ended"] - r["started"] for r in proxied)
    print(f"\n{STREAMS} streams through one worker: {sum(r['bytes'] for r in proxied) / MB:.1f} MB, "
          f"duration {durations[0]:.1f}..{durations[-1]:.1f} s, all open for {first_end - last_start:.1f} s; "
          f"worker RSS {rss_before / MB:.0f} MB before, {rss_peak / MB:.0f} MB peak")
    assert "Traceback" not in proxy.log(), proxy.log()[-5000:]
    assert proxy.proc.poll() is None


# -- slowloris --------------------------------------------------------------------------------

IDLE, SLOW_HEADERS, SLOW_BODIES = 200, 200, 100  # 500 connections that never finish a request


class _Slowloris:
    """Keep 500 connections to the proxy open that never finish a request: some send
    nothing, some trickle a request line and headers that never end, some send headers
    and then trickle a body that never ends. One thread sends the next byte on each slow
    socket about once a second and, like a real slowloris, opens a new connection of the
    same kind for each one the proxy closes, so the 500 stay open."""

    KINDS = ("idle",) * IDLE + ("headers",) * SLOW_HEADERS + ("body",) * SLOW_BODIES

    def __init__(self, port: int):
        self.port = port
        self.slots: list[list] = []  # [kind, socket, bytes sent]
        self.reopened = {kind: 0 for kind in set(self.KINDS)}
        self.lifetimes: list[float] = []  # seconds the proxy held a connection before closing it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def _connect(self, kind: str) -> list:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setblocking(False)
        if kind == "body":
            sock.send(b"POST /service/llm/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000\r\n"
                      b"Content-Type: application/octet-stream\r\n\r\n")
        elif kind == "headers":
            sock.send(b"GET /service/llm/v1/models HTTP/1.1\r\n")
        return [kind, sock, 0, time.monotonic()]

    def open(self) -> None:
        self.slots = [self._connect(kind) for kind in self.KINDS]
        self._thread.start()

    @staticmethod
    def _closed(sock: socket.socket) -> bool:
        try:
            sock.recv(1, socket.MSG_PEEK)  # EOF, or an answer (400/408): done either way
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _trickle(self) -> None:
        rounds = 0
        while not self._stop.wait(0.25):  # closed ones are replaced within a quarter second
            rounds += 1
            for slot in self.slots:
                kind, sock, sent, opened = slot
                closed = self._closed(sock)
                if not closed and kind != "idle" and rounds % 4 == 0:  # a byte a second
                    try:
                        sock.send(b"X-Slow-%d: x\r\n" % sent if kind == "headers" else b"b")
                        slot[2] += 1
                    except OSError:
                        closed = True
                if closed:
                    self.lifetimes.append(time.monotonic() - opened)
                    sock.close()
                    self.reopened[kind] += 1
                    slot[:] = self._connect(kind)

    def open_now(self) -> int:
        return sum(not self._closed(slot[1]) for slot in self.slots)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for slot in self.slots:
            slot[1].close()


@pytest.mark.timeout(180)
def test_five_hundred_slow_or_idle_connections_do_not_keep_others_waiting(backend, start_proxy):
    raise_fd_limit(2000)
    proxy = start_proxy({"llm": service_entry(backend.port)}, workers=1, log_level="INFO")
    loris = _Slowloris(proxy.port)
    try:
        loris.open()
        latencies, open_counts = [], []
        deadline = time.monotonic() + 20  # hold them open this long while others are served
        n = 0
        while time.monotonic() < deadline:
            open_counts.append(loris.open_now())
            began = time.monotonic()
            if n % 3 == 0:
                answer = requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10)
                assert answer.status_code == 200 and answer.json()["data"], answer.text
            elif n % 3 == 1:
                answer = requests.post(f"{proxy.url}/service/llm/v1/chat/completions", timeout=10,
                                       json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]})
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["message"]["content"].split() == ["tok0", "tok1", "tok2", "tok3"]
            else:
                answer = requests.get(f"{proxy.url}/service/llm/download", params={"bytes": MB}, timeout=10)
                assert answer.status_code == 200
                assert hashlib.sha256(answer.content).hexdigest() == answer.headers["X-Body-Sha256"]
            latencies.append(time.monotonic() - began)
            n += 1
            time.sleep(0.1)
    finally:
        loris.close()
    held = sorted(loris.lifetimes)
    print(f"\n{len(loris.KINDS)} slow connections kept up (open at each sample: {min(open_counts)}..{max(open_counts)}, "
          f"median {statistics.median(open_counts):.0f}; "
          f"reopened after the proxy closed them: {loris.reopened}, held "
          f"{held[0] if held else 0:.1f}..{held[-1] if held else 0:.1f} s): "
          f"{len(latencies)} other requests, slowest {max(latencies) * 1000:.0f} ms")
    assert len(latencies) >= 20
    # The slow ones really were there meanwhile (but for the moments of replacing those closed).
    assert statistics.median(open_counts) >= 450, open_counts
    assert max(latencies) < 3.0, latencies  # "promptly": a few seconds at the very most
    assert proxy.proc.poll() is None


# -- clients that never read ----------------------------------------------------------------------

NON_READERS = 100


def _worker_cpu_seconds(proxy) -> float:
    master = proxy.proc.pid
    total = 0.0
    for pid in open(f"/proc/{master}/task/{master}/children").read().split():
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


@pytest.mark.timeout(120)
def test_clients_that_never_read_hold_the_proxy_to_constant_memory(backend, start_proxy):
    """The other kind of slow client: it asks for 200 MB and reads nothing. Once the socket
    buffers on the way are full, backpressure must stop the copying (the proxy goes idle and
    holds a chunk per stream, not the body), other clients are served promptly, and once
    these leave their upstream connections close."""
    raise_fd_limit(1000)
    proxy = start_proxy({"llm": service_entry(backend.port)}, workers=1, log_level="INFO")
    requests.get(f"{proxy.url}/service/llm/v1/models", timeout=10)
    rss_before = _worker_rss(proxy)
    open_before = backend.stats()["connections_open"]
    sockets = []
    try:
        for _ in range(NON_READERS):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET /service/llm/download?bytes=209715200&mode=chunked HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sockets.append(sock)
        # First the kernel buffers on each path fill (a few MB per client: a burst of copying);
        # then the proxy must go quiet, not keep reading from the backends.
        samples = [_worker_cpu_seconds(proxy)]

        def quiet():
            time.sleep(0.5)
            samples.append(_worker_cpu_seconds(proxy))
            return samples[-1] - samples[-2] < 0.05  # under 10 % of a core
        wait_until(quiet, timeout=40, interval=0, what="the proxy to go idle while its clients do not read")
        # Each of them has its own upstream connection (+1: this very request to the backend).
        assert backend.stats()["connections_open"] >= NON_READERS + 1

        latencies, rss_peak = [], _worker_rss(proxy)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            began = time.monotonic()
            answer = requests.get(f"{proxy.url}/service/llm/download", params={"bytes": MB}, timeout=10)
            assert answer.status_code == 200
            assert hashlib.sha256(answer.content).hexdigest() == answer.headers["X-Body-Sha256"]
            latencies.append(time.monotonic() - began)
            rss_peak = max(rss_peak, _worker_rss(proxy))
            time.sleep(0.2)
        cpu_while_stuck = _worker_cpu_seconds(proxy) - samples[-1]
    finally:
        for sock in sockets:
            sock.close()
    print(f"\n{NON_READERS} clients not reading 200 MB each: worker RSS {rss_before / MB:.0f} MB before, "
          f"{rss_peak / MB:.0f} MB peak; quiet after {0.5 * (len(samples) - 1):.1f} s; "
          f"{len(latencies)} other downloads, slowest {max(latencies) * 1000:.0f} ms, "
          f"worker CPU meanwhile {cpu_while_stuck:.2f} s")
    assert rss_peak - rss_before < 64 * MB, "the proxy buffered what its clients did not read"
    assert max(latencies) < 3.0, latencies
    wait_until(lambda: backend.stats()["connections_open"] <= open_before + 1, timeout=10,
               what="the upstream connections of the clients that left to close")
