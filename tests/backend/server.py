#!/usr/bin/env python3
"""A stand-in for llama.cpp's ``llama-server``, for the proxy's tests and benchmark.

Standard library only: it also runs in a bare Debian + python3 test image.

    python3 server.py --host 127.0.0.1 --port 0 [--load-seconds 0] [--tokens 16]
        [--token-delay 0.0] [--model-name test-model] [--metrics] [--port-file PATH] [-v]

With --port 0 a free port is chosen; it is printed as ``LISTENING <port>``.

Routes ([query parameters]; "any" = any method):
  GET    /health                503 "Loading model" for --load-seconds, then {"status": "ok"}
  GET    /v1/models             OpenAI model list with one model (--model-name)
  POST   /v1/chat/completions   chat.completion, or SSE chat.completion.chunk  [delay, first_byte_delay]
  POST   /v1/completions        text_completion, or SSE of them                [delay, first_byte_delay]
  POST   /completion            llama.cpp native; its SSE ends without [DONE]  [delay, first_byte_delay]
  GET    /metrics               llama-server's Prometheus text (counts of what was served);
                                501 unless started with --metrics, as llama-server
  any    /echo, /echo/<...>     the request as received (raw target, headers, body digest)
  any    /hang                  reads the request, never answers; logs when the client leaves [seconds]
  any    /die                   SSE events, then a TCP reset mid-body          [events, delay, mode=rst|fin]
  any    /stream                SSE events carrying seq/sent_at                [events, delay, size, first_byte_delay]
  any    /download              deterministic bytes (PATTERN repeated)         [bytes, chunk, mode, delay, first_byte_delay]
  POST   /upload (or PUT)       {"bytes", "sha256"} of the body, read incrementally
  any    /cookies               three Set-Cookie and two X-Multi headers
  any    /gzip                  gzip-encoded JSON, X-Uncompressed-Sha256
  any    /status/<code>         that status with a backend-style error body
  any    /drip                  one byte per interval, chunked                 [bytes, interval]
  POST   /_crash                200, then the process exits                    [code]
  POST   /_alloc                allocates and touches mb MB, answers, frees it [mb]
                                (past a container's memory limit: OOM-killed mid-request)
  GET    /_disconnects          clients that left before/while being answered  [test_id]
  DELETE /_disconnects          forget them                                    [test_id]
  GET    /_stats                connections accepted/open, requests handled

Every SSE event is one HTTP chunk, written as soon as it is made, and (except
[DONE]) carries "seq" and "sent_at" (time.time()) so transit can be measured. As
llama-server, the completion routes add "timings" to a non-streamed answer and to the
last event of a stream (the usage event when asked for one, else the closing event).
"""
import argparse
import functools
import gzip
import hashlib
import json
import math
import os
import resource
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

PATTERN = bytes(range(251))  # prime length, so a shifted or repeated chunk changes the checksum
MAX_CHUNK = 1 << 20
_PATTERN_BLOCK = PATTERN * ((MAX_CHUNK + 2 * len(PATTERN)) // len(PATTERN))
SHA_HEADER_LIMIT = 64 << 20  # above this, hashing up front costs too much: no X-Body-Sha256
TEXT_LIMIT = 64 << 10
JSON_LIMIT = 16 << 20
MAX_HANG = 3600.0
MAX_ALLOC_MB = 64 << 10  # /_alloc: a typo must not take the host's memory
GZIP_PLAIN = json.dumps({"gzip": True, "text": "the quick brown fox jumps over the lazy dog " * 64}).encode()
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)
LOADING = (503, "Loading model", "unavailable_error")


def pattern_slice(offset, length):
    """Bytes [offset, offset + length) of the endless PATTERN stream (length <= MAX_CHUNK)."""
    start = offset % len(PATTERN)
    return _PATTERN_BLOCK[start:start + length]


@functools.lru_cache(maxsize=32)
def pattern_sha256(total):
    """Checksum of the first `total` PATTERN bytes; cached as benchmarks repeat sizes."""
    digest = hashlib.sha256()
    for offset in range(0, total, MAX_CHUNK):
        digest.update(pattern_slice(offset, min(MAX_CHUNK, total - offset)))
    return digest.hexdigest()


class HttpError(Exception):
    """An error answer in llama.cpp's format; `close` when the connection can't be reused."""

    def __init__(self, status, message, kind="invalid_request_error", close=False):
        super().__init__(message)
        self.status, self.message, self.kind, self.close = status, message, kind, close

    def body(self):
        return {"error": {"code": self.status, "message": self.message, "type": self.kind}}


class ClientGone(Exception):
    """The client hung up: stop generating."""


class _Stop(BaseException):
    """Raised by the signal handler to leave serve_forever() from the main thread."""


class BodyReader:
    """A request body framed by Content-Length or chunked encoding, read piece by piece."""

    def __init__(self, rfile, headers):
        self.rfile = rfile
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self.done = False
        self.remaining = 0 if self.chunked else self._length(headers.get("Content-Length"))

    @staticmethod
    def _length(value):
        if value is None:
            return 0
        if not value.strip().isdigit():
            raise HttpError(400, f"bad Content-Length: {value!r}", close=True)
        return int(value)

    def _read(self, size, line=False):
        try:
            data = self.rfile.readline(size) if line else self.rfile.read(size)
        except OSError as exc:
            raise HttpError(400, f"reading the body failed: {exc}", close=True) from None
        if not data:
            raise HttpError(400, "request body ended early", close=True)
        return data

    def _fixed(self, size):
        while self.remaining > 0:
            data = self._read(min(size, self.remaining))
            self.remaining -= len(data)
            yield data

    def pieces(self, size=65536):
        """Yield the rest of the body, at most `size` bytes at a time."""
        if not self.chunked:
            yield from self._fixed(size)
            return
        while not self.done:
            line = self._read(1024, line=True)
            try:
                self.remaining = int(line.split(b";")[0].strip(), 16)  # chunk extensions ignored
            except ValueError:
                raise HttpError(400, f"bad chunk size line: {line[:40]!r}", close=True) from None
            if self.remaining == 0:
                while self._read(65537, line=True) not in (b"\r\n", b"\n"):
                    pass  # trailers are read and ignored
                self.done = True
                return
            yield from self._fixed(size)
            if self._read(3, line=True) not in (b"\r\n", b"\n"):
                raise HttpError(400, "chunk not followed by CRLF", close=True)

    def read_all(self, limit):
        data = bytearray()
        for piece in self.pieces():
            data += piece
            if len(data) > limit:
                raise HttpError(413, f"body over {limit} bytes", close=True)
        return bytes(data)

    def drain(self):
        for _ in self.pieces():
            pass


class State:
    """Counters and the disconnect log, shared by all handler threads."""

    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.disconnects = []
        self.counts = {"connections_accepted": 0, "connections_open": 0, "requests": 0}
        # What llama-server's /metrics reports, for the completions served.
        self.served = {"prompt_tokens": 0, "prompt_seconds": 0.0, "tokens_predicted": 0,
                       "tokens_predicted_seconds": 0.0, "n_decode": 0, "n_tokens_max": 0, "processing": 0}

    def bump(self, name, by=1):
        with self.lock:
            self.counts[name] += by

    def completion_began(self):
        with self.lock:
            self.served["processing"] += 1

    def completion_ended(self, timings=None):
        with self.lock:
            served = self.served
            served["processing"] -= 1
            if timings is not None:
                served["prompt_tokens"] += timings["prompt_n"]
                served["prompt_seconds"] += timings["prompt_ms"] / 1e3
                served["tokens_predicted"] += timings["predicted_n"]
                served["tokens_predicted_seconds"] += timings["predicted_ms"] / 1e3
                served["n_decode"] += timings["predicted_n"] + 1  # one batch for the prompt, one per token
                served["n_tokens_max"] = max(served["n_tokens_max"], timings["prompt_n"] + timings["predicted_n"])

    def metrics_text(self):
        """llama-server's exposition, line for line: HELP, TYPE and one sample per family."""
        with self.lock:
            served = dict(self.served)
        prompt_rate = served["prompt_tokens"] / served["prompt_seconds"] if served["prompt_seconds"] else 0.0
        predicted_rate = (served["tokens_predicted"] / served["tokens_predicted_seconds"]
                          if served["tokens_predicted_seconds"] else 0.0)
        families = [
            ("prompt_tokens_total", "Number of prompt tokens processed.", "counter", served["prompt_tokens"]),
            ("prompt_seconds_total", "Prompt process time", "counter", served["prompt_seconds"]),
            ("tokens_predicted_total", "Number of generation tokens processed.", "counter", served["tokens_predicted"]),
            ("tokens_predicted_seconds_total", "Predict process time", "counter", served["tokens_predicted_seconds"]),
            ("n_decode_total", "Total number of llama_decode() calls", "counter", served["n_decode"]),
            ("n_tokens_max", "Largest observed n_tokens.", "counter", served["n_tokens_max"]),
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s.", "gauge", prompt_rate),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s.", "gauge", predicted_rate),
            ("kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.", "gauge",
             min(1.0, served["processing"] / 4)),
            ("kv_cache_tokens", "KV-cache tokens.", "gauge", 0),
            ("requests_processing", "Number of requests processing.", "gauge", served["processing"]),
            ("requests_deferred", "Number of requests deferred.", "gauge", 0),
            ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call", "gauge",
             1.0 if served["n_decode"] else 0.0),
        ]
        return "".join(f"# HELP llamacpp:{name} {text}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value:g}\n"
                       for name, text, kind, value in families)

    def loading(self):
        return time.monotonic() - self.started < self.args.load_seconds

    def add_disconnect(self, record):
        with self.lock:
            self.disconnects.append(record)

    def list_disconnects(self, test_id=None):
        with self.lock:
            return [d for d in self.disconnects if test_id is None or d["test_id"] == test_id]

    def clear_disconnects(self, test_id=None):
        with self.lock:
            kept = [d for d in self.disconnects if test_id is not None and d["test_id"] != test_id]
            cleared, self.disconnects = len(self.disconnects) - len(kept), kept
            return cleared


def rss_kb():
    """This process's resident memory now (Linux), in KiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


def token_count(request, default):
    for key in ("n_predict", "max_tokens", "max_completion_tokens"):
        value = request.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default  # absent, or llama.cpp's -1 ("until the model stops")


def prompt_tokens(request):
    """Whitespace words of the prompt and messages: a stable stand-in for a tokenizer."""
    messages = request.get("messages") if isinstance(request.get("messages"), list) else []
    parts = [request.get("prompt")] + [m.get("content") for m in messages if isinstance(m, dict)]
    return sum(len(p.split()) for p in parts if isinstance(p, str))


def token(i):
    return f"tok{i} "


def usage(prompt_n, n):
    return {"prompt_tokens": prompt_n, "completion_tokens": n, "total_tokens": prompt_n + n}


def timings(prompt_n, n, prompt_seconds, predicted_seconds):
    """llama-server's "timings" (result_timings::to_json), from the times this answer took."""
    prompt_ms = max(prompt_seconds * 1e3, 0.001)
    predicted_ms = max(predicted_seconds * 1e3, 0.001 * max(n, 1))
    return {"cache_n": 0, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1e3 / prompt_ms * prompt_n,
            "predicted_n": n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / n if n else 0.0,
            "predicted_per_second": 1e3 / predicted_ms * n}


def response_head(kind, model, stream):
    """Fields shared by a whole OpenAI-style answer (empty for llama.cpp's native format)."""
    if kind == "native":
        return {}
    prefix, obj = {"chat": ("chatcmpl-", "chat.completion"), "text": ("cmpl-", "text_completion")}[kind]
    obj += ".chunk" if stream and kind == "chat" else ""
    return {"id": prefix + uuid.uuid4().hex, "object": obj, "created": int(time.time()), "model": model}


def full_answer(kind, head, n, prompt_n):
    text = "".join(token(i) for i in range(n))
    if kind == "native":
        return {"content": text, "id_slot": 0, "stop": True, "model": head.get("model"),
                "tokens_predicted": n, "tokens_evaluated": prompt_n, "stop_type": "eos",
                "stopping_word": "", "truncated": False}
    choice = {"index": 0, "logprobs": None, "finish_reason": "stop"}
    choice.update({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
    return {**head, "choices": [choice], "usage": usage(prompt_n, n)}


def stream_event(kind, head, i, n, prompt_n):
    """Event i of a stream of n tokens; event n is the closing one (finish_reason "stop")."""
    last = i == n
    text = "" if last else token(i)
    if kind == "native":
        extra = {"stop_type": "eos", "model": head.get("model"), "tokens_evaluated": prompt_n} if last else {}
        return {"content": text, "stop": last, "id_slot": 0, "tokens_predicted": min(i + 1, n), **extra}
    choice = {"index": 0, "logprobs": None, "finish_reason": "stop" if last else None}
    if kind == "chat":
        delta = {"role": "assistant"} if i == 0 else {}
        choice["delta"] = {**delta, "content": text} if not last else delta
    else:
        choice["text"] = text
    return {**head, "choices": [choice]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # each event leaves at once, not after the previous one's ACK
    server_version = "fake-llama-server/1"

    ROUTES = {
        "/health": "route_health", "/v1/models": "route_models", "/v1/chat/completions": "route_chat",
        "/v1/completions": "route_text", "/completion": "route_native", "/metrics": "route_metrics",
        "/echo": "route_echo",
        "/hang": "route_hang", "/die": "route_die", "/stream": "route_stream",
        "/download": "route_download", "/upload": "route_upload", "/cookies": "route_cookies",
        "/gzip": "route_gzip", "/drip": "route_drip", "/_crash": "route_crash", "/_alloc": "route_alloc",
        "/_disconnects": "route_disconnects", "/_stats": "route_stats",
    }
    PREFIXES = (("/echo/", "route_echo"), ("/status/", "route_status"))

    def __getattr__(self, name):
        # Any method token (GET, PROPFIND, ...) goes to the router: /echo accepts them all.
        if name.startswith("do_") and name[3:].isalpha() and name[3:].isupper():
            return self.dispatch
        raise AttributeError(name)

    def log_message(self, format, *args):
        if self.server.state.args.verbose:
            super().log_message(format, *args)

    # -- request plumbing -------------------------------------------------

    def dispatch(self):
        self.server.state.bump("requests")
        # self.path may be normalised ("//x" -> "/x"); the request line is what was sent.
        self.raw_path, _, self.raw_query = self.requestline.split()[1].partition("?")
        self.query = parse_qs(self.raw_query)
        self.first_byte_sent, self.bytes_sent = False, 0
        try:
            try:
                self.body = BodyReader(self.rfile, self.headers)
                getattr(self, self.find_route())()
            except HttpError as err:
                self.send_error_json(err)
            if not self.close_connection:
                self.body.drain()  # the next request on this connection starts after the body
        except ClientGone:
            self.record_disconnect()
            self.close_connection = True
        except HttpError:
            self.close_connection = True

    def find_route(self):
        name = self.ROUTES.get(self.raw_path) or next(
            (route for prefix, route in self.PREFIXES if self.raw_path.startswith(prefix)), None)
        if not name:
            raise HttpError(404, f"File Not Found: {self.raw_path}", "not_found_error")
        return name

    def require(self, *methods):
        if self.command not in methods:
            raise HttpError(405, f"{self.command} not allowed; use {' or '.join(methods)}")

    def qstr(self, name, default=None):
        values = self.query.get(name)
        return values[-1] if values else default

    def qnum(self, name, default, kind=float):
        text = self.qstr(name)
        try:
            value = default if text is None else kind(text)
        except ValueError:
            raise HttpError(400, f"bad {name}: {text!r}") from None
        if value < 0 or not math.isfinite(value):
            raise HttpError(400, f"bad {name}: {text!r}")
        return value

    def read_json(self):
        try:
            request = json.loads(self.body.read_all(JSON_LIMIT) or b"{}")
        except ValueError as exc:
            raise HttpError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(request, dict):
            raise HttpError(400, "JSON body must be an object")
        return request

    def client_left(self):
        """EOF (FIN) or an error on the client's socket; peeking leaves any pending bytes alone."""
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def pause(self, seconds):
        """Wait `seconds` (at least one check), raising ClientGone as soon as the client hangs up."""
        deadline = time.monotonic() + seconds
        poller = select.poll()  # not select.select(): fds pass FD_SETSIZE with 1,000+ clients
        poller.register(self.connection, select.POLLIN)
        while True:
            left = max(0.0, deadline - time.monotonic())
            if poller.poll(left * 1000):
                if self.client_left():
                    raise ClientGone()
                time.sleep(max(0.0, deadline - time.monotonic()))  # pipelined bytes: can't watch
                return
            if left == 0:
                return

    def record_disconnect(self):
        self.server.state.add_disconnect({
            "path": self.raw_path, "test_id": self.headers.get("X-Test-Id"),
            "phase": "mid_stream" if self.first_byte_sent else "before_first_byte",
            "bytes_sent": self.bytes_sent, "at": time.time()})

    # -- response plumbing ------------------------------------------------

    def send_head(self, status, headers):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)  # "Connection: close" also sets close_connection
        try:
            self.end_headers()
        except OSError:
            raise ClientGone() from None
        self.first_byte_sent = True

    def write(self, data, payload):
        """Send raw bytes, `payload` of which are body (the rest is chunk framing)."""
        if self.command == "HEAD":
            return
        try:
            self.wfile.write(data)
        except OSError:
            raise ClientGone() from None
        self.bytes_sent += payload

    def send_bytes(self, status, body, headers):
        self.send_head(status, list(headers) + [("Content-Length", str(len(body)))])
        self.write(body, len(body))

    def send_json(self, status, obj, headers=()):
        self.send_bytes(status, json.dumps(obj).encode(), [("Content-Type", "application/json")] + list(headers))

    def send_error_json(self, err):
        if self.first_byte_sent:  # too late for a status: cut the response short instead
            self.close_connection = True
            return
        self.send_json(err.status, err.body(), [("Connection", "close")] if err.close else [])

    def start_chunked(self, content_type, headers=()):
        self.send_head(200, [("Content-Type", content_type), ("Cache-Control", "no-cache"),
                             ("Transfer-Encoding", "chunked"), *headers])

    def send_chunk(self, data):
        self.write(b"%x\r\n%s\r\n" % (len(data), data), len(data))  # one sendall per chunk

    def end_chunked(self):
        self.write(b"0\r\n\r\n", 0)

    def send_event(self, obj, seq, size=0):
        """One SSE event as one chunk, stamped just before it is written."""
        data = json.dumps({**obj, "seq": seq, "sent_at": time.time()})
        pad = size - len(data) - len('data: , "pad": ""\n\n')
        if pad > 0:  # grow the event to about `size` bytes
            data = data[:-1] + ', "pad": "' + "x" * pad + '"}'
        self.send_chunk(b"data: " + data.encode() + b"\n\n")

    def abort(self, reset):
        """Drop the connection mid-body: no final chunk; with SO_LINGER 0, close() sends RST."""
        try:
            if reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            self.rfile.close()  # rfile holds a reference that would defer the real close
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True

    # -- llama.cpp routes -------------------------------------------------

    def route_health(self):
        if self.server.state.loading():
            raise HttpError(*LOADING)
        self.send_json(200, {"status": "ok"})

    def route_models(self):
        model = {"id": self.server.state.args.model_name, "object": "model",
                 "created": int(time.time()), "owned_by": "llamacpp"}
        self.send_json(200, {"object": "list", "data": [model]})

    def route_chat(self):
        self.complete("chat")

    def route_text(self):
        self.complete("text")

    def route_native(self):
        self.complete("native")

    def route_metrics(self):
        self.require("GET")
        if not self.server.state.args.metrics:
            raise HttpError(501, "This server does not support metrics endpoint. Start it with `--metrics`",
                            "not_supported_error")
        self.send_bytes(200, self.server.state.metrics_text().encode(),
                        [("Content-Type", "text/plain; version=0.0.4")])

    def complete(self, kind):
        self.require("POST")
        args = self.server.state.args
        request = self.read_json()
        if self.server.state.loading():
            raise HttpError(*LOADING)
        model = request["model"] if isinstance(request.get("model"), str) else args.model_name
        head = response_head(kind, model, bool(request.get("stream")))
        n, prompt_n = token_count(request, args.tokens), prompt_tokens(request)
        delay = self.qnum("delay", args.token_delay)
        state, done = self.server.state, None
        state.completion_began()
        try:
            began = time.monotonic()
            self.pause(self.qnum("first_byte_delay", 0.0))  # "processing the prompt"
            prompt_seconds = time.monotonic() - began
            if not request.get("stream"):
                self.pause(delay * n)  # a non-streamed answer comes once the whole text is made
                done = timings(prompt_n, n, prompt_seconds, time.monotonic() - began - prompt_seconds)
                self.send_json(200, {**full_answer(kind, head or {"model": model}, n, prompt_n), "timings": done})
                return
            options = request.get("stream_options")
            with_usage = kind != "native" and isinstance(options, dict) and options.get("include_usage")
            self.start_chunked("text/event-stream")
            for i in range(n + 1):
                if i < n:
                    self.pause(delay)  # "generating" token i
                event = stream_event(kind, head or {"model": model}, i, n, prompt_n)
                if i == n:
                    done = timings(prompt_n, n, prompt_seconds, time.monotonic() - began - prompt_seconds)
                    if not with_usage:
                        event["timings"] = done  # llama-server: on the last event of the answer
                self.send_event(event, seq=i)
            if with_usage:
                self.send_event({**head, "choices": [], "usage": usage(prompt_n, n), "timings": done}, seq=n + 1)
            if kind != "native":  # llama.cpp sends [DONE] on its OpenAI routes only
                self.send_chunk(b"data: [DONE]\n\n")
            self.end_chunked()
        finally:
            state.completion_ended(done)

    # -- transport test routes --------------------------------------------

    def route_echo(self):
        digest, length, kept = hashlib.sha256(), 0, bytearray()
        for piece in self.body.pieces():
            digest.update(piece)
            length += len(piece)
            if length < TEXT_LIMIT:
                kept += piece
        try:
            text = kept.decode("utf-8") if length < TEXT_LIMIT else None
        except UnicodeDecodeError:
            text = None
        self.send_json(200, {
            "method": self.command, "raw_path": self.raw_path, "query": self.raw_query,
            "headers": [[name, value] for name, value in self.headers.items()],
            "body_length": length, "body_sha256": digest.hexdigest(), "body": text})

    def route_hang(self):
        self.body.drain()
        self.pause(min(self.qnum("seconds", MAX_HANG), MAX_HANG))  # ClientGone when it leaves
        self.close_connection = True  # nobody left: give up without a word

    def route_die(self):
        events, delay = self.qnum("events", 3, int), self.qnum("delay", 0.05)
        self.start_chunked("text/event-stream")
        for i in range(events):
            self.pause(delay)
            self.send_event({"message": "about to die"}, seq=i)
        time.sleep(max(delay, 0.05))  # let the events land: a reset discards unsent data
        self.abort(reset=self.qstr("mode", "rst") != "fin")

    def route_stream(self):
        events, delay = self.qnum("events", 5, int), self.qnum("delay", 0.0)
        size = self.qnum("size", 0, int)
        self.pause(self.qnum("first_byte_delay", 0.0))
        self.start_chunked("text/event-stream")
        for i in range(events):
            self.pause(delay)
            self.send_event({"path": "/stream"}, seq=i, size=size)
        self.send_chunk(b"data: [DONE]\n\n")
        self.end_chunked()

    def route_download(self):
        total, mode = self.qnum("bytes", 1 << 20, int), self.qstr("mode", "chunked")
        chunk, delay = max(1, min(self.qnum("chunk", 65536, int), MAX_CHUNK)), self.qnum("delay", 0.0)
        framing = {"chunked": ("Transfer-Encoding", "chunked"), "length": ("Content-Length", str(total)),
                   "close": ("Connection", "close")}
        if mode not in framing:
            raise HttpError(400, "mode must be chunked, length or close")
        headers = [("Content-Type", "application/octet-stream"), framing[mode]]
        if total <= SHA_HEADER_LIMIT:
            headers.append(("X-Body-Sha256", pattern_sha256(total)))
        self.pause(self.qnum("first_byte_delay", 0.0))
        self.send_head(200, headers)
        for offset in range(0, total, chunk):
            self.pause(delay)
            piece = pattern_slice(offset, min(chunk, total - offset))
            self.send_chunk(piece) if mode == "chunked" else self.write(piece, len(piece))
        if mode == "chunked":
            self.end_chunked()

    def route_upload(self):
        self.require("POST", "PUT")
        digest, length = hashlib.sha256(), 0
        for piece in self.body.pieces():
            digest.update(piece)
            length += len(piece)
        self.send_json(200, {"bytes": length, "sha256": digest.hexdigest()})

    def route_cookies(self):
        headers = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Set-Cookie", "c=3"),
                   ("X-Multi", "one"), ("X-Multi", "two")]
        self.send_json(200, {"cookies": {"a": "1", "b": "2", "c": "3"}}, headers)

    def route_gzip(self):
        self.send_bytes(200, GZIP_BODY, [
            ("Content-Type", "application/json"), ("Content-Encoding", "gzip"),
            ("X-Uncompressed-Sha256", hashlib.sha256(GZIP_PLAIN).hexdigest())])

    def route_status(self):
        text = self.raw_path[len("/status/"):]
        if not (text.isdigit() and 200 <= int(text) <= 599):
            raise HttpError(400, f"status must be 200..599, not {text!r}")
        code = int(text)
        if code in (204, 304):  # these may not carry a body
            self.send_head(code, [])
            return
        self.send_json(code, {"error": {"code": code, "message": f"backend says {code}"}})

    def route_drip(self):
        total, interval = self.qnum("bytes", 10, int), self.qnum("interval", 0.1)
        self.start_chunked("application/octet-stream")
        for i in range(total):
            if i:
                self.pause(interval)
            self.send_chunk(pattern_slice(i, 1))
        self.end_chunked()

    # -- control routes ---------------------------------------------------

    def route_crash(self):
        self.require("POST")
        code = self.qnum("code", 1, int)
        self.send_json(200, {"exiting": code}, [("Connection", "close")])
        threading.Timer(0.1, os._exit, (code,)).start()  # after the answer has left

    def route_alloc(self):
        self.require("POST")
        mb = self.qnum("mb", 1, int)
        if mb > MAX_ALLOC_MB:
            raise HttpError(400, f"mb must be at most {MAX_ALLOC_MB}")
        before_kb = rss_kb()
        held = [b"\xa5" * (1 << 20) for _ in range(mb)]  # every page written, so resident
        self.send_json(200, {"allocated_mb": len(held), "rss_kb_before": before_kb, "rss_kb": rss_kb()})
        del held

    def route_disconnects(self):
        self.require("GET", "DELETE")
        state, test_id = self.server.state, self.qstr("test_id")
        if self.command == "DELETE":
            self.send_json(200, {"cleared": state.clear_disconnects(test_id)})
        else:
            self.send_json(200, {"disconnects": state.list_disconnects(test_id)})

    def route_stats(self):
        with self.server.state.lock:
            counts = dict(self.server.state.counts)
        self.send_json(200, counts)


class BackendServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # no list of thousands of threads to join at exit
    allow_reuse_address = True
    request_queue_size = 4096

    def __init__(self, address, args):
        self.state = State(args)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def server_bind(self):
        # HTTPServer's version calls getfqdn(), which can stall on DNS in a container.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        self.state.bump("connections_accepted")
        self.state.bump("connections_open")
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.state.bump("connections_open", -1)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # clients vanishing are routine here
            super().handle_error(request, client_address)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Fake llama.cpp server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--load-seconds", type=float, default=0.0, help="503 'Loading model' this long")
    parser.add_argument("--tokens", type=int, default=16, help="tokens when the request gives none")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per token")
    parser.add_argument("--model-name", default="test-model")
    parser.add_argument("--metrics", action="store_true", help="serve /metrics (llama-server's flag)")
    parser.add_argument("--port-file", help="also write the port here (atomically)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each request to stderr")
    return parser.parse_args(argv)


def raise_fd_limit():
    """Each streaming client holds a socket; the usual soft limit of 1024 is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def announce(port, port_file):
    """Port file first, so whoever sees the LISTENING line can rely on the file too."""
    if port_file:
        tmp = f"{port_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, port_file)  # readers never see a half-written file
    print(f"LISTENING {port}", flush=True)


def _stop(signum, frame):
    raise _Stop()


def main(argv=None):
    args = parse_args(argv)
    raise_fd_limit()
    threading.stack_size(512 << 10)  # 1,000 handler threads: keep their reserved stacks small
    # As PID 1 in a container, SIGTERM is ignored unless handled.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server = None
    try:
        server = BackendServer((args.host, args.port), args)
        announce(server.server_address[1], args.port_file)
        server.serve_forever(poll_interval=0.5)
    except _Stop:
        pass
    finally:
        if server:
            server.server_close()
    sys.stdout.flush()
    os._exit(0)  # don't wait for (or finalise around) handler threads still streaming


if __name__ == "__main__":
    main()
