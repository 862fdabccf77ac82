"""A floor for the fixed stack: the least a Flask + requests + gunicorn-gevent forwarder does.

    BACKEND_PORT=P gunicorn --worker-class gevent ... --chdir bench stack_floor:app

One Flask view: the body read whole, one request upstream through a requests adapter with
``stream=True`` (no Session), the answer handed back as a generator of ``read1`` chunks.
No config, no header filtering beyond the hop-by-hop ones, no admission, no disconnect
watcher, no logging; only the proxy's free tricks (headers of an event stream sent at
once, a small body passed as bytes). Whatever the proxy costs above this is the proxy's own work; what
this costs is the fixed stack (Flask, requests, gunicorn with gevent). ``run.py --floor`` adds it as the column
"stack", started with the shipped gunicorn settings that matter (workers, connections,
keep-alive).

Three thinner apps take the stack apart layer by layer (``bench/layers.py``):
``wsgi_fixed`` (gunicorn and gevent only), ``flask_fixed`` (plus Flask) and
``wsgi_forward`` (gunicorn, gevent and requests, no Flask).
"""
import json
import os

import requests
from flask import Flask, Response, request
from requests.adapters import HTTPAdapter

_BACKEND = f"http://127.0.0.1:{os.environ.get('BACKEND_PORT', '0')}"
_PREFIX = "/service/bench"
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})

app = Flask(__name__)
_adapter = None  # made in the worker on first use, after gevent patched it
# About the size of the test backend's 16-token chat completion
_FIXED = json.dumps({"id": "chatcmpl-floor", "object": "chat.completion", "model": "bench",
                     "choices": [{"index": 0, "finish_reason": "length",
                                  "message": {"role": "assistant", "content": "token " * 16}}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}}).encode()


def _pool() -> HTTPAdapter:
    global _adapter
    if _adapter is None:
        _adapter = HTTPAdapter(pool_connections=4, pool_maxsize=1024, pool_block=False, max_retries=0)
    return _adapter


@app.route(f"{_PREFIX}/<path:path>", methods=["GET", "POST", "PUT"])
def forward(path: str):
    prepared = requests.PreparedRequest()
    prepared.method = request.method
    prepared.url = f"{_BACKEND}{request.full_path[len(_PREFIX):].rstrip('?')}"
    prepared.headers = {"Content-Type": request.content_type or "application/octet-stream"}
    length = request.content_length
    if length and length > 64 * 1024:  # an upload: streamed, with its length
        prepared.headers["Content-Length"] = str(length)
        prepared.body = request.stream
    else:
        prepared.body = request.get_data() or None
    prepared.hooks = {"response": []}
    upstream = _pool().send(prepared, stream=True, timeout=(5, 600))

    event_stream = upstream.headers.get("Content-Type", "").startswith("text/event-stream")

    def body():
        try:
            if event_stream:
                yield b""  # gunicorn sends the headers now, not with the first event
            while data := upstream.raw.read1(65536, decode_content=False):
                yield data
        finally:
            upstream.close()
    headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP]
    if upstream.headers.get("Content-Length"):
        headers.append(("Content-Length", upstream.headers["Content-Length"]))
    return Response(body(), status=upstream.status_code, headers=headers)


def wsgi_fixed(environ, start_response):
    """A fixed answer straight from WSGI: what gunicorn and gevent cost alone."""
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(_FIXED)))])
    return [_FIXED]


flask_fixed = Flask(__name__ + ".fixed")


@flask_fixed.route(f"{_PREFIX}/<path:path>", methods=["GET", "POST", "PUT"])
def fixed(path: str):
    """The same fixed answer from a Flask view: plus what Flask costs."""
    request.get_data()
    return Response(_FIXED, content_type="application/json")


def wsgi_forward(environ, start_response):
    """The stack floor's forwarding without Flask: plus what requests costs."""
    prepared = requests.PreparedRequest()
    prepared.method = environ["REQUEST_METHOD"]
    query = environ.get("QUERY_STRING")
    prepared.url = _BACKEND + environ["PATH_INFO"][len(_PREFIX):] + (f"?{query}" if query else "")
    prepared.headers = {"Content-Type": environ.get("CONTENT_TYPE") or "application/octet-stream"}
    prepared.body = environ["wsgi.input"].read() or None
    prepared.hooks = {"response": []}
    upstream = _pool().send(prepared, stream=True, timeout=(5, 600))
    start_response(f"{upstream.status_code} {upstream.reason}",
                   [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP]
                   + [("Content-Length", upstream.headers["Content-Length"])] * ("Content-Length" in upstream.headers))

    def body():
        try:
            while data := upstream.raw.read1(65536, decode_content=False):
                yield data
        finally:
            upstream.close()
    return body()
