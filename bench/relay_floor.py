#!/usr/bin/env python3
"""A floor for any gevent proxy: bytes relayed between client and backend, nothing else.

    python bench/relay_floor.py --backend-port P --port-file F

One upstream connection per client connection, one greenlet per direction, recv then
sendall: no HTTP parsing, no framework. Whatever the proxy costs per chunk above this
relay is Python and library work; what this relay costs is gevent's loop and the
kernel's loopback. ``run.py --floor`` adds it as the column "relay".
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patching)
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402


def pipe(source, sink) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-port", type=int, required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def handle(client, _address) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", args.backend_port))
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = gevent.spawn(pipe, upstream, client)
        pipe(client, upstream)
        back.join()
        upstream.close()
        client.close()

    server = StreamServer(("127.0.0.1", 0), handle, backlog=4096)
    server.start()
    tmp = f"{args.port_file}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{server.server_port}\n")
    os.replace(tmp, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
