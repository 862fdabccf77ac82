#!/usr/bin/env python3
"""The benchmark's load client: one process of gevent greenlets on raw sockets.

It runs as a process of its own (never inside the proxy), so its CPU never counts as the
proxy's, and it is lean (pre-built requests, a minimal HTTP/1.1 parser) so that it is not
the bottleneck: it reports its own CPU time so a run can show that.

    python bench/load.py < spec.json > result.json

A spec is one JSON object; ``kind`` picks the load:
  requests  ``concurrency`` keep-alive connections send ``count`` requests in all, or
            for ``duration`` seconds; latencies in ms.
  streams   ``count`` SSE streams, at most ``concurrency`` at a time (``burst``: all at
            once, each on a fresh connection); time to first byte, per-event transit
            (arrival - the backend's ``sent_at``) and inter-event gaps, in ms.
  upload    POST ``bytes`` of body; download: GET and read ``bytes``. MB/s.
Timestamps are ``time.time()`` where they meet the backend's ``sent_at`` (same machine,
same clock) and ``perf_counter()`` for plain latencies.
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402  (after patching, so every socket is gevent's)
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402

_RECV = 256 * 1024


def raise_nofile() -> None:
    """1,000 streams need more descriptors than the usual soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class Closed(Exception):
    pass


class Conn:
    """One client connection with a receive buffer; ``t`` is when the last bytes came."""

    __slots__ = ("sock", "buf", "t")

    def __init__(self, host: str, port: int, timeout: float):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.t = 0.0

    def fill(self) -> None:
        data = self.sock.recv(_RECV)
        if not data:
            raise Closed("connection closed by the server")
        self.t = time.time()
        self.buf += data  # bytearray: deleting from the front later is O(1) in CPython

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def build_request(method: str, path: str, host: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench-load\r\n{extra}"
    if method in ("POST", "PUT"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def read_head(conn: Conn) -> tuple[int, dict, float]:
    """Status, headers (lower-case bytes names) and the time the first byte arrived."""
    first = conn.t if conn.buf else 0.0
    while True:
        end = conn.buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        conn.fill()
        first = first or conn.t
    lines = bytes(conn.buf[:end]).split(b"\r\n")
    del conn.buf[:end + 4]
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, first


def read_body(conn: Conn, headers: dict, on_piece=None) -> tuple[int, bool]:
    """Read the body by its framing; on_piece(bytes, arrival time) sees each piece.
    Returns (body bytes, connection reusable)."""
    keep = headers.get(b"connection", b"").lower() != b"close"
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return _read_chunked(conn, on_piece), keep
    length = headers.get(b"content-length")
    if length is None:  # close-delimited
        total = 0
        try:
            while True:
                if conn.buf:
                    total += _take(conn, len(conn.buf), on_piece)
                conn.fill()
        except Closed:
            return total, False
    remaining = int(length)
    while remaining:
        if not conn.buf:
            conn.fill()
        remaining -= _take(conn, min(remaining, len(conn.buf)), on_piece)
    return int(length), keep


def _take(conn: Conn, n: int, on_piece) -> int:
    if on_piece is not None:
        on_piece(bytes(conn.buf[:n]), conn.t)
    del conn.buf[:n]
    return n


def _read_chunked(conn: Conn, on_piece) -> int:
    total = 0
    while True:
        while (eol := conn.buf.find(b"\r\n")) < 0:
            conn.fill()
        size = int(bytes(conn.buf[:eol]).split(b";")[0], 16)
        del conn.buf[:eol + 2]
        if size == 0:
            while True:  # trailers, then the empty line
                while (eol := conn.buf.find(b"\r\n")) < 0:
                    conn.fill()
                del conn.buf[:eol + 2]
                if eol == 0:
                    return total
        remaining = size
        while remaining:
            if not conn.buf:
                conn.fill()
            remaining -= _take(conn, min(remaining, len(conn.buf)), on_piece)
        total += size
        while len(conn.buf) < 2:
            conn.fill()
        del conn.buf[:2]


class SSE:
    """Splits a body into events; keeps (arrival, sent_at) of each stamped one."""

    __slots__ = ("pending", "stamps", "events", "done")

    def __init__(self):
        self.pending = bytearray()
        self.stamps: list[tuple[float, float]] = []
        self.events = 0
        self.done = False

    def feed(self, piece: bytes, arrived: float) -> None:
        self.pending += piece
        while (end := self.pending.find(b"\n\n")) >= 0:
            event = bytes(self.pending[:end])
            del self.pending[:end + 2]
            self.events += 1
            if event.startswith(b"data: [DONE]"):
                self.done = True
                continue
            at = event.find(b'"sent_at": ')
            if at >= 0:
                start = at + 11
                stop = min(i for i in (event.find(b",", start), event.find(b"}", start), len(event)) if i >= 0)
                self.stamps.append((arrived, float(event[start:stop])))


# ---------------------------------------------------------------- loads


def run_requests(spec: dict) -> dict:
    host, port, timeout = spec["host"], spec["port"], spec.get("timeout", 30.0)
    request = build_request(spec.get("method", "POST"), spec["path"], f"{host}:{port}",
                            spec.get("body", "").encode())
    expect = spec.get("expect", "").encode()
    concurrency = spec["concurrency"]
    count, duration = spec.get("count"), spec.get("duration")
    latencies: list[float] = []
    errors: list[str] = []
    go, warmed, warm_ups = Event(), [0], [0]
    state = {"left": count, "deadline": None}

    def one(conn: Conn | None) -> Conn | None:
        if conn is None:
            conn = Conn(host, port, timeout)
        conn.sock.sendall(request)
        status, headers, _ = read_head(conn)
        body = bytearray()
        _, keep = read_body(conn, headers, lambda piece, _t: body.extend(piece))
        if status != 200 or expect not in body:
            raise ValueError(f"status {status}")
        if not keep:
            conn.close()
            return None
        return conn

    def worker() -> None:
        conn = None
        try:
            conn = one(None)  # warm-up: connect and one request, not timed (but served: counted)
            warm_ups[0] += 1
        except Exception as exc:  # noqa: BLE001 - every failure is a counted error
            errors.append(f"warm-up: {exc!r}")
            conn = None
        warmed[0] += 1
        go.wait()
        while True:
            if state["deadline"] is not None:
                if time.perf_counter() >= state["deadline"]:
                    break
            else:
                if state["left"] <= 0:
                    break
                state["left"] -= 1
            started = time.perf_counter()
            try:
                with gevent.Timeout(timeout):
                    conn = one(conn)
                latencies.append((time.perf_counter() - started) * 1000)
            except BaseException as exc:  # noqa: BLE001 - gevent.Timeout is a BaseException
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                errors.append(repr(exc)[:200])
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    workers = [gevent.spawn(worker) for _ in range(concurrency)]
    while warmed[0] < concurrency:
        gevent.sleep(0.01)
    started = time.perf_counter()
    if duration is not None:
        state["deadline"] = started + duration
    go.set()
    gevent.joinall(workers)
    elapsed = time.perf_counter() - started
    return {"latencies_ms": latencies, "completed": len(latencies), "errors": len(errors),
            "warm_ups": warm_ups[0], "error_samples": errors[:5], "elapsed_s": elapsed}


def run_streams(spec: dict) -> dict:
    host, port, timeout = spec["host"], spec["port"], spec.get("timeout", 60.0)
    request = build_request("POST", spec["path"], f"{host}:{port}", spec["body"].encode(),
                            "Accept: text/event-stream\r\n")
    expect_events = spec["expect_events"]  # stamped events per stream
    burst = spec.get("burst", False)
    count = spec["count"]
    concurrency = count if burst else spec["concurrency"]
    ttfb, first_event, transit, gaps = [], [], [], []
    result = {"errors": 0, "incomplete": 0, "error_samples": [], "events": 0, "streams": 0}
    go = Event()
    queue = list(range(count))

    def one(conn: Conn | None) -> Conn | None:
        sse = SSE()
        started = time.time()
        keep = False
        try:
            with gevent.Timeout(timeout):
                if conn is None:
                    conn = Conn(host, port, timeout)
                conn.sock.sendall(request)
                status, headers, first = read_head(conn)
                if status != 200:
                    raise ValueError(f"status {status}")
                _, keep = read_body(conn, headers, sse.feed)
        except BaseException as exc:  # noqa: BLE001 - counted, the run goes on
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            result["errors"] += 1
            result["error_samples"].append(repr(exc)[:200])
            if conn is not None:
                conn.close()
            return None
        result["streams"] += 1
        result["events"] += sse.events
        if not sse.done or len(sse.stamps) != expect_events:
            result["incomplete"] += 1
        ttfb.append((first - started) * 1000)
        if sse.stamps:
            first_event.append((sse.stamps[0][0] - started) * 1000)
        previous = None
        for arrived, sent in sse.stamps:
            transit.append((arrived - sent) * 1000)
            if previous is not None:
                gaps.append((arrived - previous) * 1000)
            previous = arrived
        if burst or not keep:  # a burst is many new clients: one connection each
            conn.close()
            return None
        return conn

    def worker() -> None:
        conn = None
        go.wait()
        while queue:
            queue.pop()
            conn = one(conn)
        if conn is not None:
            conn.close()

    workers = [gevent.spawn(worker) for _ in range(concurrency)]
    gevent.sleep(0)  # every worker is waiting on `go`: the burst starts at one instant
    started = time.perf_counter()
    go.set()
    gevent.joinall(workers)
    result.update(ttfb_ms=ttfb, first_event_ms=first_event, transit_ms=transit, gaps_ms=gaps, elapsed_s=time.perf_counter() - started)
    result["error_samples"] = result["error_samples"][:5]
    return result


def run_upload(spec: dict) -> dict:
    host, port, total = spec["host"], spec["port"], spec["bytes"]
    block = bytes(range(256)) * 4096  # 1 MiB, sent again and again: the client holds no more
    conn = Conn(host, port, spec.get("timeout", 120.0))
    head = (f"POST {spec['path']} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {total}\r\n\r\n").encode()
    started = time.perf_counter()
    conn.sock.sendall(head)
    sent = 0
    while sent < total:
        piece = block[:min(len(block), total - sent)]
        conn.sock.sendall(piece)
        sent += len(piece)
    status, headers, _ = read_head(conn)
    body = bytearray()
    read_body(conn, headers, lambda piece, _t: body.extend(piece))
    elapsed = time.perf_counter() - started
    conn.close()
    received = json.loads(body).get("bytes") if status == 200 else None
    ok = status == 200 and received == total
    return {"ok": ok, "status": status, "bytes": total, "elapsed_s": elapsed,
            "mb_per_s": total / elapsed / 1e6, "errors": 0 if ok else 1}


def run_download(spec: dict) -> dict:
    host, port, total = spec["host"], spec["port"], spec["bytes"]
    conn = Conn(host, port, spec.get("timeout", 120.0))
    started = time.perf_counter()
    conn.sock.sendall(build_request("GET", spec["path"], f"{host}:{port}"))
    status, headers, _ = read_head(conn)
    received, _ = read_body(conn, headers)
    elapsed = time.perf_counter() - started
    conn.close()
    ok = status == 200 and received == total
    return {"ok": ok, "status": status, "bytes": received, "elapsed_s": elapsed,
            "mb_per_s": received / elapsed / 1e6, "errors": 0 if ok else 1}


LOADS = {"requests": run_requests, "streams": run_streams, "upload": run_upload, "download": run_download}


def main() -> None:
    raise_nofile()
    spec = json.load(sys.stdin)
    wall = time.perf_counter()
    result = LOADS[spec["kind"]](spec)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["client_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["client_wall_s"] = time.perf_counter() - wall
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
