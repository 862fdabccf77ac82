"""A second "host" inside this machine for the multi-host tests: a network namespace joined
to the root one by a veth pair (10.213.0.1 here, 10.213.0.2 there: all traffic stays on
this machine), and in it a dockerd of its own (tests/engines.py) serving
``tcp://10.213.0.2:2376`` with ``--tlsverify``, with a CA, server and client certificate
made here with openssl. The proxy reaches that engine, and the ports published on it, only
over the address, as it would another box.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import engines

NETNS = "ipx-remote"
VETH_HERE, VETH_THERE = "ipx-rh0", "ipx-rh1"
HERE, THERE = "10.213.0.1", "10.213.0.2"
PREFIX_LENGTH = 30
DOCKER_PORT = 2376
REMOTE = engines.Dockerd(name="inference-proxy-remote", bridge="ipx-rbr0", bridge_address="10.213.1.1/24")


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path  # the client's
    key: Path

    def config(self) -> dict:
        return {"ca": str(self.ca), "cert": str(self.cert), "key": str(self.key)}


@dataclass(frozen=True)
class RemoteHost:
    pid: int
    tls: Tls
    address: str = THERE

    @property
    def docker_host(self) -> str:
        return f"tcp://{THERE}:{DOCKER_PORT}"

    @property
    def local_socket(self) -> str:
        """The same engine through its unix socket (the filesystem is shared): for the tests'
        own look at it, never the proxy's."""
        return REMOTE.host

    def engine_config(self) -> dict:
        return {"docker_host": self.docker_host, "tls": self.tls.config(), "address": self.address}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> tuple[Tls, Tls]:
    """A CA, then a server certificate for THERE and a client certificate, both signed by it.
    Returns (the server's files, the client's)."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=inference-proxy test CA", cwd=directory)
    for name, extensions in (("server", f"subjectAltName=IP:{THERE}\nextendedKeyUsage=serverAuth\n"),
                             ("client", "extendedKeyUsage=clientAuth\n")):
        (directory / f"{name}.ext").write_text(extensions)
        _openssl("req", "-new", *ec, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
                 "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2", "-extfile", f"{name}.ext",
                 cwd=directory)
    ca = directory / "ca.pem"
    return (Tls(ca, directory / "server-cert.pem", directory / "server-key.pem"),
            Tls(ca, directory / "client-cert.pem", directory / "client-key.pem"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def create_network() -> None:
    """The namespace and the veth pair between it and this one, addresses up."""
    tear_down_network()  # what a killed session left
    _ip("netns", "add", NETNS)
    _ip("link", "add", VETH_HERE, "type", "veth", "peer", "name", VETH_THERE)
    _ip("link", "set", VETH_THERE, "netns", NETNS)
    _ip("addr", "add", f"{HERE}/{PREFIX_LENGTH}", "dev", VETH_HERE)
    _ip("link", "set", VETH_HERE, "up")
    _ip("-n", NETNS, "addr", "add", f"{THERE}/{PREFIX_LENGTH}", "dev", VETH_THERE)
    _ip("-n", NETNS, "link", "set", VETH_THERE, "up")
    _ip("-n", NETNS, "link", "set", "lo", "up")


def tear_down_network() -> None:
    _ip("link", "del", VETH_HERE, check=False)  # takes its peer with it
    _ip("netns", "del", NETNS, check=False)


def start(workdir: Path) -> RemoteHost:
    """The namespace, the certificates and the dockerd in it, answering over TLS. nsenter, not
    ``ip netns exec``: that one remounts /sys, hiding the cgroup mounts dockerd needs."""
    server_tls, client_tls = make_certificates(workdir / "tls")
    create_network()
    engines.create_bridge(REMOTE.bridge, REMOTE.bridge_address, netns=NETNS)
    REMOTE.config_file.write_text("{}\n")
    args = [*REMOTE.args(), "-H", f"tcp://{THERE}:{DOCKER_PORT}", "--tlsverify",
            "--tlscacert", str(server_tls.ca), "--tlscert", str(server_tls.cert), "--tlskey", str(server_tls.key)]
    pid = engines.start_dockerd(args, REMOTE.pidfile, REMOTE.log_path, wrapper=("nsenter", f"--net=/run/netns/{NETNS}", "--"))
    engines.wait_until_answers(REMOTE.host, pid=pid, log_path=REMOTE.log_path)
    return RemoteHost(pid, client_tls)


def stop() -> None:
    """dockerd by its PID (thawed first), then the namespace and the veth pair."""
    engines.stop_dockerd(REMOTE.pidfile)
    tear_down_network()
