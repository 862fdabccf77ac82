"""The wire to a backend: header filtering, the pooled connection, streaming the answer.

Everything here is on the hot path, so it stays small: pure functions over frozensets for
headers, one ``requests`` adapter per worker (pooled, keep-alive, never blocking, blind to
proxy variables in the environment), and a body iterator that hands on every chunk as it
arrives.
"""
from __future__ import annotations

import errno
import http.client
import socket
import threading
from typing import Iterable, Iterator
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.timeout import _DEFAULT_TIMEOUT

# RFC 9110 §7.6.1; plus Host and Content-Length, which the stack sets from what is sent.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length"}
# What a client may say about the hops before it only through a trusted front proxy
# (server.trusted_proxies); from anyone else these are dropped and the proxy's own sent.
_FORWARDING = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                         "x-forwarded-port", "x-forwarded-prefix", "x-real-ip"})
_NOT_FORWARDED_UNTRUSTED = _NOT_FORWARDED | _FORWARDING
_READ_SIZE = 64 * 1024
_UPLOAD_BLOCK = 256 * 1024  # an upload is read and sent this much at a time (urllib3: 16 KiB)

# Which upstream connection the current greenlet is using, so a watcher that sees the
# client leave can shut that exact socket down (threading.local is per greenlet under
# gevent's patching).
_current = threading.local()


def _connection_tokens(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


def request_headers(environ: dict, upstream_host: str, from_trusted_proxy: bool = False,
                    backend_key: str | None = None) -> dict[str, str]:
    """Headers to send upstream: the client's less hop-by-hop ones, plus X-Forwarded-*.

    ``backend_key`` (the service's backend_api_key): sent as the Authorization, in place of
    whatever the client sent there.

    A trusted front proxy's forwarding headers go on (the client's address appended to its
    X-Forwarded-For); anyone else's are replaced by what the proxy itself saw.
    """
    drop = (_NOT_FORWARDED if from_trusted_proxy else _NOT_FORWARDED_UNTRUSTED) \
        | _connection_tokens(environ.get("HTTP_CONNECTION"))
    headers = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").title()
            if name.lower() not in drop:
                headers[name] = value
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    client = environ.get("REMOTE_ADDR", "")
    prior = environ.get("HTTP_X_FORWARDED_FOR") if from_trusted_proxy else None
    headers["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
    headers["X-Forwarded-Proto"] = environ.get("wsgi.url_scheme", "http")  # gunicorn: trusted proxies only
    if environ.get("HTTP_HOST") and "X-Forwarded-Host" not in headers:
        headers["X-Forwarded-Host"] = environ["HTTP_HOST"]
    headers["Host"] = upstream_host
    if backend_key is not None:
        headers.pop("Authorization", None)
        headers["Authorization"] = f"Bearer {backend_key}"
    return headers


def backend_headers(service) -> dict[str, str]:
    """The headers of the proxy's own requests to a service (health probes, metrics scrapes)."""
    headers = {"Host": service.upstream_host}
    if service.backend_api_key:
        headers["Authorization"] = f"Bearer {service.backend_api_key}"
    return headers


def client_target(environ: dict) -> str:
    """The request target, path and query, byte for byte as the client sent it.

    Flask hands views a decoded path (``%2F`` becomes ``/``); gunicorn keeps the raw
    target. An absolute-form target (``http://host/path``) keeps only its path and query:
    the backend is ours, whatever host the client named. A ``#fragment`` is the client's
    own business (RFC 9110 §4.2.5): it never goes on.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:  # a WSGI server that keeps no raw target: rebuild from the decoded one
        query = environ.get("QUERY_STRING")
        raw = environ.get("PATH_INFO", "") + (f"?{query}" if query else "")
    if "#" in raw:
        raw = raw.partition("#")[0]
    if not raw.startswith("/"):
        parts = urlsplit(raw)
        raw = parts.path + (f"?{parts.query}" if parts.query else "")
    return raw


def response_headers(items: Iterable[tuple[str, str]], connection: str | None,
                     chunked: bool = False) -> list[tuple[str, str]]:
    """The backend's headers less hop-by-hop ones; repeated headers stay repeated.

    A Content-Length goes on only where it is the length of the bytes the client will get:
    not beside ``Transfer-Encoding: chunked`` (the body comes de-chunked, and RFC 9112 §6.3
    says the chunking frames it), nor when it is not one plain number. Without one,
    gunicorn frames the body itself, so a kept-alive connection stays in step.
    """
    drop = HOP_BY_HOP | _connection_tokens(connection)
    kept = []
    for name, value in items:
        lower = name.lower()
        if lower in drop or (lower == "content-length" and (chunked or not (value.isascii() and value.isdigit()))):
            continue
        kept.append((name, value))
    return kept


class SizedBody:
    """The client's body as a stream whose length requests can see, so it goes up
    with the client's Content-Length instead of being read whole or re-chunked."""

    def __init__(self, stream, length: int):
        self._stream = stream
        self._length = length

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)


def chunked_body(stream) -> Iterator[bytes]:
    """A chunked upload read piece by piece (the WSGI server de-chunks it)."""
    while True:
        data = stream.read(_READ_SIZE)
        if not data:
            return
        yield data


class Exchange:
    """One request's link to its upstream connection, for cutting it from outside."""

    __slots__ = ("connection", "client_gone", "done", "on_cut", "responding", "target")

    def __init__(self, target: str | None = None):
        self.target = target  # the request target exactly as the client sent it
        self.connection: HTTPConnection | None = None
        self.client_gone = False
        self.done = False
        self.responding = False  # the answer is handed to the WSGI server: it writes to the client now
        self.on_cut = None  # also called when the client leaves (say, to leave a queue)

    def cut(self) -> None:
        """The client left: shut the upstream socket so the backend stops generating."""
        self.client_gone = True
        if self.on_cut is not None:
            self.on_cut()
        connection = None if self.done else self.connection
        sock = getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(2)  # SHUT_RDWR: wakes a read blocked in another greenlet
            except OSError:
                pass


class ClientGone(ConnectionError):
    """Raised instead of sending upstream when the client has already left."""


class _FinalResponse(http.client.HTTPResponse):
    """Reads past interim answers to the final one. http.client skips only 100 Continue: a
    backend's 103 Early Hints would be taken for its answer, and the real one left unread."""

    def _read_status(self):
        version, status, reason = super()._read_status()
        while 101 < status < 200:  # 100: begin() skips it; 101 switches protocols: final
            http.client.parse_headers(self.fp)  # the interim answer's headers: dropped
            version, status, reason = super()._read_status()
        return version, status, reason


class _TrackedConnection(HTTPConnection):
    response_class = _FinalResponse

    @property
    def is_connected(self) -> bool:
        # urllib3 asks this of every pooled connection before reuse; its answer goes
        # through gevent's patched select.poll (watchers, a hub switch). One peek on the
        # real non-blocking socket says the same: readable (EOF or stray bytes) = dropped.
        sock = self.sock
        if sock is None:
            return False
        try:
            getattr(sock, "_sock", sock).recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing to read: still connected
        except OSError:
            return False
        return False  # EOF or stray bytes

    def _new_conn(self) -> socket.socket:
        # Every backend is a literal 127.0.0.1:<port>; urllib3 would still ask getaddrinfo,
        # which gevent hands to a thread pool: a thread hop per new connection that a
        # burst of streams queues behind. A literal address needs no lookup.
        try:
            socket.inet_pton(socket.AF_INET, self._dns_host)  # strict: "127.1" is not literal here
        except OSError:
            return super()._new_conn()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            for option in self.socket_options or ():
                sock.setsockopt(*option)
            if self.timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(self.timeout)
            sock.connect((self._dns_host, self.port))
        except socket.timeout as exc:
            sock.close()
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. "
                                            f"(connect timeout={self.timeout})") from exc
        except OSError as exc:
            sock.close()
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        return sock

    def request(self, method, url, *args, **kwargs):
        exchange = getattr(_current, "exchange", None)
        if exchange is not None:
            if exchange.client_gone:
                raise ClientGone(errno.ECONNABORTED, "client left before the request was sent")
            exchange.connection = self
            if exchange.target is not None:
                # urllib3 re-encodes targets (%2f -> %2F; one bad escape and every % becomes
                # %25): send the client's bytes instead.
                url = exchange.target
        return super().request(method, url, *args, **kwargs)


class _TrackedPool(HTTPConnectionPool):
    ConnectionCls = _TrackedConnection


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, blocksize=_UPLOAD_BLOCK, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _TrackedPool}

    def build_response(self, req, resp):
        # requests' own also guesses the text encoding and runs the cookie jar over the
        # headers (MockRequest, cookielib): a proxy passes Set-Cookie through untouched.
        response = requests.Response()
        response.status_code = resp.status
        response.headers = resp.headers  # urllib3's HTTPHeaderDict: case-insensitive already
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


class UpstreamPool:
    """Per-worker pooled connections to every backend; made on first use, never at import
    (a session made before gevent patches would block the event loop)."""

    def __init__(self, max_per_backend: int = 1024):
        self._max_per_backend = max_per_backend
        self._adapter: HTTPAdapter | None = None

    @property
    def adapter(self) -> HTTPAdapter:
        if self._adapter is None:
            # pool_block=False: past the size, extra connections are made and dropped
            # rather than waiting forever (requests never passes a pool timeout).
            self._adapter = _Adapter(pool_connections=16, pool_maxsize=self._max_per_backend,
                                     pool_block=False, max_retries=0)
        return self._adapter

    def send(self, method: str, url: str, headers: dict, body, timeout: tuple[float, float],
             exchange: Exchange | None = None) -> requests.Response:
        """Send one request and return as soon as the response headers are in.

        The URL is used as given (no re-quoting), so the client's percent-encoding and
        query string reach the backend byte for byte. The adapter is called directly: a
        Session would add cookie-jar bookkeeping and proxy lookups we do not want.
        """
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = url
        prepared.headers = headers
        prepared.body = body
        prepared.hooks = {"response": []}
        _current.exchange = exchange
        try:
            return self.adapter.send(prepared, stream=True, timeout=timeout, proxies={})
        finally:
            _current.exchange = None

    def close(self) -> None:
        if self._adapter is not None:
            self._adapter.close()
            self._adapter = None


def iter_body(response: requests.Response) -> Iterator[bytes]:
    """Yield the body as the backend sends it: each read returns what has arrived
    (read1), the bytes as sent (no gzip decoding), never an empty chunk (which a chunked
    writer would take for the end)."""
    raw = response.raw
    while True:
        data = raw.read1(_READ_SIZE, decode_content=False)
        if not data:
            return
        yield data
