"""The configuration as frozen dataclasses: the one place where every default lives.

The schema (``schema.py``) loads only what the file says; whatever it leaves out takes the
default written here.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

SERVICE_TYPES = {"llama-cpp-server": {"container_port": 8080, "health_path": "/health", "metrics_path": "/metrics"}}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_MAX_QUEUE = 100  # services.<id>.max_queue when only max_concurrent is set
MIN_MASKED_LENGTH = 4  # ${VAR} values shorter than this are not masked in the log
PULL_POLICIES = ("missing", "always", "never")  # as in Compose




class _TypeDefault:
    """The default of a field that ``None`` cannot mark, because ``None`` means "off"."""

    def __repr__(self) -> str:
        return "TYPE_DEFAULT"


TYPE_DEFAULT = _TypeDefault()
NULL_MEANS_OFF = frozenset({"metrics_path"})  # per-type keys where an explicit null turns the feature off


class ConfigError(Exception):
    """The config is unusable. ``errors`` holds one human-readable line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# ---------------------------------------------------------------- the configuration


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    read: float = 600.0  # seconds between bytes from the backend, not for the whole reply


@dataclass(frozen=True)
class Resources:
    gpus: None | str | int | tuple[str, ...] = None  # None, "all", a count, or device ids
    memory: str | None = None  # as written, e.g. "16g" (docker parses it)
    cpus: float | None = None
    shm_size: str | None = None


@dataclass(frozen=True)
class Volume:
    host_path: str
    container_path: str
    mode: str = "rw"


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials for the registry of a service's image (Docker's auth_config)."""

    username: str
    password: str = field(repr=False)  # a secret: masked in logs, never shown


@dataclass(frozen=True)
class ServiceConfig:
    id: str
    type: str
    image: str
    port: int
    container_port: int | None = None  # None: the type's default (SERVICE_TYPES)
    args: tuple[str, ...] = ()
    volumes: tuple[Volume, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()  # sorted by name, after ${VAR} expansion
    resources: Resources = Resources()
    health_path: str | None = None  # None: the type's default (SERVICE_TYPES)
    # The server's own Prometheus metrics, merged into the proxy's /metrics; None: not scraped
    metrics_path: str | None = TYPE_DEFAULT  # type: ignore[assignment]  # the type's default
    timeouts: Timeouts = Timeouts()
    stop_timeout: float = 10.0
    max_body_size: int | None = None  # bytes a request body may have; None: no limit
    # The OpenAI-compatible front door and the on-demand lifecycle:
    aliases: tuple[str, ...] = ()  # more model names routed to this service (besides its id)
    model_name: str | None = None  # when set, the request body's "model" is rewritten to it
    autostart: bool = False  # a request for a stopped service starts it and waits
    start_timeout: float = 300.0  # seconds a request waits for an autostarted service
    idle_timeout: float | None = None  # stop after this many seconds without requests; None: never
    group: str | None = None  # a key of Config.groups
    max_concurrent: int | None = None  # requests in flight to the service (all workers); None: no limit
    max_queue: int | None = None  # requests waiting for a slot; DEFAULT_MAX_QUEUE with max_concurrent
    drain_timeout: float = 60.0  # seconds in-flight requests get before an exclusive swap or idle stop
    # The image: pull it when missing (missing), on every start (always) or never.
    pull_policy: str = "missing"
    registry_auth: RegistryAuth | None = None  # None: the engine's own credentials, if any

    def __post_init__(self):
        for name, default in SERVICE_TYPES[self.type].items():
            value = getattr(self, name)
            if value is TYPE_DEFAULT or (value is None and name not in NULL_MEANS_OFF):
                object.__setattr__(self, name, default)
        if self.max_concurrent is not None and self.max_queue is None:
            object.__setattr__(self, "max_queue", DEFAULT_MAX_QUEUE)

    @property
    def upstream_host(self) -> str:
        """Where the proxy reaches the container: its port, published on loopback."""
        return f"127.0.0.1:{self.port}"

    def to_dict(self) -> dict:
        """A plain JSON-able dict (for hashing what shapes the container)."""
        data = dataclasses.asdict(self)
        data["args"] = list(self.args)
        data["aliases"] = list(self.aliases)
        data["volumes"] = [dataclasses.asdict(volume) for volume in self.volumes]
        data["environment"] = dict(self.environment)
        if isinstance(self.resources.gpus, tuple):
            data["resources"]["gpus"] = list(self.resources.gpus)
        return data


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 11000
    log_level: str = "INFO"
    container_prefix: str = "inference-proxy"  # containers are named <prefix>-<service id>
    # Secrets: kept out of repr() so a logged config never shows them.
    admin_token: str | None = field(default=None, repr=False)  # None: /api/v1 is open
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: /service/... is open
    # Browsers (proxy/routes/cross_site.py). Host names answered besides localhost, the loopback
    # addresses and `host`, which always are; "*": any. Against DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    # Web page origins ("http://localhost:3000") that may call the proxy from a browser; "*":
    # any. A request from any other page (an Origin header) is refused.
    cors_origins: tuple[str, ...] = ()
    # The client's request body: the longest pause between its bytes; the largest JSON body
    # /v1 reads whole; how many bytes of such bodies one worker may hold at once.
    body_timeout: float = 30.0
    max_json_body: int = 16 * 1024 ** 2
    max_buffered: int = 256 * 1024 ** 2
    # Addresses or networks of front proxies whose X-Forwarded-* headers are believed; empty: none.
    trusted_proxies: tuple[str, ...] = ()
    _trusted_networks: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        networks = tuple(ipaddress.ip_network(entry) for entry in self.trusted_proxies)
        object.__setattr__(self, "_trusted_networks", networks)

    def is_trusted_proxy(self, address: str) -> bool:
        """Is the peer at ``address`` one of ``trusted_proxies``?"""
        if not self._trusted_networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted_networks)


@dataclass(frozen=True)
class GroupConfig:
    name: str
    exclusive: bool = False  # at most one service of the group runs at a time


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    services: Mapping[str, ServiceConfig]  # read-only, in file order
    source: str  # the file path (or a label) used in messages
    groups: Mapping[str, GroupConfig] = field(default_factory=lambda: types.MappingProxyType({}))
    # What ${VAR} references brought in from the environment (the loader fills it in).
    expanded_values: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    # (model name, service) for every id and alias, in file order; built once, from services
    _models: tuple[tuple[str, ServiceConfig], ...] = field(init=False, repr=False, compare=False)
    _by_model: Mapping[str, ServiceConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        models = tuple((name, service) for service in self.services.values()
                       for name in (service.id, *service.aliases))
        by_model: dict[str, ServiceConfig] = {}
        for name, service in models:
            by_model.setdefault(name, service)  # the loader makes names unique; first one wins
        object.__setattr__(self, "_models", models)
        object.__setattr__(self, "_by_model", types.MappingProxyType(by_model))

    @property
    def secrets(self) -> frozenset[str]:
        """Values no log line may show: the admin token, the API keys, the registry passwords
        and everything that came from the environment through ${VAR} (but the shortest, which
        would mask common words and numbers everywhere)."""
        values = {value for value in self.expanded_values if len(value) >= MIN_MASKED_LENGTH}
        values.update(self.server.api_keys)
        values.update(service.registry_auth.password for service in self.services.values() if service.registry_auth)
        if self.server.admin_token:
            values.add(self.server.admin_token)
        return frozenset(values)

    def service_for_model(self, model: str) -> ServiceConfig | None:
        """The service a model name (a service id or one of its aliases) routes to, or None."""
        return self._by_model.get(model) if isinstance(model, str) else None

    def models(self) -> list[tuple[str, ServiceConfig]]:
        """Every model name with its service, in file order: each id, then its aliases."""
        return list(self._models)
