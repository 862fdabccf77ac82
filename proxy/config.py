"""Load and validate ``config.yaml`` into frozen dataclasses.

Pure module: PyYAML, marshmallow and the standard library only (no docker, flask, loguru),
so it can be imported and tested anywhere.

Pipeline (``load_config_text``):
  1. parse YAML with a safe loader that rejects duplicate keys and keeps dates as text;
  2. expand ``${VAR}`` / ``${VAR:-default}`` in string values (see ``proxy.envsubst``);
  3. validate with marshmallow schemas (``unknown = RAISE`` everywhere, so typos fail);
  4. apply ``PROXY_LOG_LEVEL``.
Every problem found is collected and raised together as one ``ConfigError``, one line
each: ``"<source>: <dotted.key.path>: <message>"``, sorted by key path. No input, however
malformed, produces anything but a ``Config`` or a ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml
from marshmallow import (RAISE, Schema, ValidationError, fields, post_load, pre_load, validate,
                         validates_schema)

from .envsubst import expand_tree

__all__ = [
    "Config", "ConfigError", "DEFAULT_MAX_QUEUE", "GroupConfig", "LOG_LEVELS", "Resources",
    "SERVICE_TYPES", "ServerConfig", "ServiceConfig", "Timeouts", "Volume", "config_path",
    "load_config", "load_config_text", "parse_duration", "parse_size",
]

# Per-type defaults; the keys are also the allowed values of `type`.
SERVICE_TYPES = {"llama-cpp-server": {"container_port": 8080, "health_path": "/health"}}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_CONFIG_PATH = "config.yaml"
DEFAULT_MAX_QUEUE = 100  # services.<id>.max_queue when only max_concurrent is set


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
class ServiceConfig:
    id: str
    type: str
    image: str
    port: int
    container_port: int
    args: tuple[str, ...]
    volumes: tuple[Volume, ...]
    environment: tuple[tuple[str, str], ...]  # sorted by name, after ${VAR} expansion
    resources: Resources
    health_path: str
    timeouts: Timeouts
    stop_timeout: float
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

    def __post_init__(self):
        if self.max_concurrent is not None and self.max_queue is None:
            object.__setattr__(self, "max_queue", DEFAULT_MAX_QUEUE)

    @property
    def upstream_host(self) -> str:
        """Where the proxy reaches the container: its port, published on loopback."""
        return f"127.0.0.1:{self.port}"

    def to_dict(self, *, redact: bool = False) -> dict:
        """A plain JSON-able dict: for hashing the config (redact=False) and for printing
        summaries (redact=True replaces environment values, which may be secrets)."""
        data = dataclasses.asdict(self)
        data["args"] = list(self.args)
        data["aliases"] = list(self.aliases)
        data["volumes"] = [dataclasses.asdict(volume) for volume in self.volumes]
        data["environment"] = {name: "***" if redact else value for name, value in self.environment}
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

    def service_for_model(self, model: str) -> ServiceConfig | None:
        """The service a model name (a service id or one of its aliases) routes to, or None."""
        return self._by_model.get(model) if isinstance(model, str) else None

    def models(self) -> list[tuple[str, ServiceConfig]]:
        """Every model name with its service, in file order: each id, then its aliases."""
        return list(self._models)


# ---------------------------------------------------------------- fields

SERVICE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
GROUP_NAME = re.compile(SERVICE_ID.pattern + r"\Z")  # the same form, for validate.Regexp
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}\Z")  # "llama3:8b", "org/Model-8B"
# ASCII digits only: \d would also take other scripts' digits ("１０m").
DURATION = re.compile(r"(\d+(\.\d+)?(ms|s|m|h))+\Z", re.ASCII)  # "90s", "10m", "1h30m", "500ms"
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)", re.ASCII)
PLAIN_SECONDS = re.compile(r"-?\d+(\.\d+)?\Z", re.ASCII)  # a number as text, as ${VAR} gives
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SIZE = r"\d+(\.\d+)?([kmg]b?|b)?\Z"  # the forms docker's parse_bytes accepts
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")  # an index or a GPU/MIG UUID

SERVICE_ID_ERROR = ("Service id must be 1-63 characters of lowercase letters, digits, "
                    "'-', '_' or '.', starting with a letter or digit.")
GROUP_NAME_ERROR = ("Group name must be 1-63 characters of lowercase letters, digits, "
                    "'-', '_' or '.', starting with a letter or digit.")
MODEL_NAME_ERROR = ("Must be a model name of 1-200 letters, digits, '.', '_', ':', '/' or '-', "
                    "starting with a letter or digit.")
DURATION_ERROR = "Must be a duration like '10m', '90s', '1h' or a number of seconds."
ENV_NAME_ERROR = "Environment variable names must match [A-Za-z_][A-Za-z0-9_]*."
GPUS_ERROR = "Must be 'all', a positive count, or a list of device ids."
VOLUME_ERROR = "Must be 'HOST:CONTAINER[:ro|rw]' with absolute paths."
SIZE_ERROR = "Must be a size like '16g': a number with an optional b, k, m or g suffix."
TOKEN = re.compile(r"[!-~]+\Z")  # printable ASCII, no spaces: it must fit in "Bearer <token>"
TOKEN_ERROR = "Must be a non-empty token of printable ASCII characters without spaces."
UNKNOWN_FIELD = "Unknown field."
LOG_LEVEL_ERROR = f"PROXY_LOG_LEVEL: Must be one of: {', '.join(LOG_LEVELS)}."
PORT_RANGE = validate.Range(min=1, max=65535)


def _as_int(value) -> int | None:
    """An int from an int (not a bool) or from a string of digits, as ``${VAR}`` gives."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        return int(value)
    return None


class Int(fields.Integer):
    """An integer. Rejects bools and floats; accepts digit strings so `port: ${PORT}` works."""

    def _deserialize(self, value, attr, data, **kwargs):
        number = _as_int(value)
        if number is None:
            raise self.make_error("invalid")
        return number


class Text(fields.String):
    """A string; YAML numbers and booleans are taken as text (8192 -> "8192", true -> "true"),
    since users write `LLAMA_ARG_CTX_SIZE: 8192`."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        return super()._deserialize(value, attr, data, **kwargs)


class Size(Text):
    """A byte size like "16g", kept as written; a plain YAML number means bytes."""

    def __init__(self, **kwargs):
        super().__init__(validate=validate.Regexp(SIZE, flags=re.IGNORECASE, error=SIZE_ERROR), **kwargs)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_size(text: str) -> int:
    """Bytes in a size of the SIZE form, counted as docker's parse_bytes does (k, m, g are
    multiples of 1024, a fraction is rounded down), without importing docker.

    Raises:
        OverflowError: the number is beyond a float's range.
    """
    text = text.lower()
    if len(text) > 1 and text[-1] == "b" and text[-2] in "kmg":
        text = text[:-1]
    unit = text[-1] if text[-1] in _SIZE_UNITS else ""
    return int(float(text[:len(text) - len(unit)]) * _SIZE_UNITS[unit])


class ByteSize(Text):
    """A byte size like "10m" (the same forms as Size), loaded as a number of bytes."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            if re.match(SIZE, text, flags=re.IGNORECASE):
                return parse_size(text)
        except OverflowError:
            pass
        raise ValidationError(SIZE_ERROR)


class Token(Text):
    """A secret (a token or an API key); its value never appears in a message."""

    def __init__(self, **kwargs):
        super().__init__(validate=validate.Regexp(TOKEN, error=TOKEN_ERROR), **kwargs)


class LogLevel(fields.String):
    """One of LOG_LEVELS, in any case."""

    def __init__(self, **kwargs):
        super().__init__(validate=validate.OneOf(LOG_LEVELS), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).upper()


class Gpus(fields.Field):
    """"all", a positive count, or a non-empty list of device ids (ints become strings)."""

    default_error_messages = {"invalid": GPUS_ERROR}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) and value.lower() == "all":
            return "all"
        count = _as_int(value)
        if count is not None and count >= 1:
            return count
        if isinstance(value, list) and value:
            ids = [item if _as_int(item) is None else str(item) for item in value]
            if all(isinstance(i, str) and DEVICE_ID.fullmatch(i) for i in ids):
                return tuple(ids)
        raise self.make_error("invalid")


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value) -> float | None:
    """Seconds in a duration: a number (not a bool), a number as text, or units summed like
    "1h30m" (h, m, s, ms). None when it is none of these or not finite. Not range-checked."""
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond a float's range
            return None
    elif isinstance(value, str) and PLAIN_SECONDS.match(value):
        seconds = float(value)
    elif isinstance(value, str) and DURATION.match(value):
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in DURATION_PART.findall(value))
    return seconds if seconds is not None and math.isfinite(seconds) else None


class Duration(fields.Field):
    """A duration in seconds: a number, or a string like "90s", "10m", "1h30m", "500ms".
    Loaded as a float; give the allowed range with ``validate``."""

    default_error_messages = {"invalid": DURATION_ERROR}

    def _deserialize(self, value, attr, data, **kwargs):
        seconds = parse_duration(value)
        if seconds is None:
            raise self.make_error("invalid")
        return seconds


class ModelNames(fields.Field):
    """A list of model names, loaded as a tuple. On errors the valid part keeps the
    positions (None where an item failed), so the cross-service checks name the right index."""

    default_error_messages = {"invalid": "Not a valid list."}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.item = fields.String(validate=validate.Regexp(MODEL_NAME, error=MODEL_NAME_ERROR))

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise self.make_error("invalid")
        names, errors = [], {}
        for index, item in enumerate(value):
            try:
                names.append(self.item.deserialize(item))
            except ValidationError as exc:
                names.append(None)
                errors[index] = exc.messages
        if errors:
            raise ValidationError(errors, valid_data=tuple(names))
        return tuple(names)


class VolumeSpec(fields.Field):
    """Docker's short form "HOST:CONTAINER[:ro|rw]"; whether HOST exists is checked at start."""

    default_error_messages = {"invalid": VOLUME_ERROR}

    def _deserialize(self, value, attr, data, **kwargs):
        parts = value.split(":") if isinstance(value, str) else []
        if len(parts) == 2:
            parts.append("rw")
        if len(parts) == 3 and parts[2] in ("ro", "rw") and all(p.startswith("/") for p in parts[:2]):
            return Volume(*parts)
        raise self.make_error("invalid")


class KeyedDict(fields.Dict):
    """A mapping whose errors sit under the user's own keys ("services.a.port").

    marshmallow's Dict nests them under "key"/"value" markers, which would end up in the
    dotted paths. A bad key's message goes on the key itself (under "_schema").
    """

    def __init__(self, key_pattern: re.Pattern, key_error: str, values: fields.Field, **kwargs):
        super().__init__(values=values, **kwargs)
        self.key_pattern, self.key_error = key_pattern, key_error

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, Mapping):
            raise self.make_error("invalid")
        result, errors = {}, {}
        for key, raw in value.items():
            key_ok = isinstance(key, str) and self.key_pattern.fullmatch(key)
            messages = [] if key_ok else [self.key_error]
            try:
                result[key] = self.value_field.deserialize(raw, **kwargs)
            except ValidationError as exc:
                result[key] = exc.valid_data  # partial data, for the port cross-checks
                messages = _merge_messages(messages, exc.messages)
            if messages:
                errors[key] = messages
        if errors:
            raise ValidationError(errors, valid_data=result)
        return result


def _merge_messages(key_messages: list, value_messages):
    if not key_messages:
        return value_messages
    if isinstance(value_messages, dict):
        merged = dict(value_messages)
        merged["_schema"] = key_messages + list(merged.get("_schema", []))
        return merged
    return key_messages + list(value_messages)


# ---------------------------------------------------------------- schemas


class StrictSchema(Schema):
    """Unknown keys are errors; an explicit null in an optional key means "the default"
    (so an empty `resources:` or `server:` section is fine)."""

    error_messages = {"type": "Not a valid mapping type.", "unknown": UNKNOWN_FIELD}

    class Meta:
        unknown = RAISE

    @pre_load
    def _null_means_default(self, data, **kwargs):
        if not isinstance(data, Mapping):
            return data  # marshmallow reports the wrong type
        return {key: value for key, value in data.items()
                if value is not None or key not in self.load_fields or self.load_fields[key].required}


class TimeoutsSchema(StrictSchema):
    connect = fields.Float(load_default=5.0, validate=validate.Range(min=0, min_inclusive=False))
    read = fields.Float(load_default=600.0, validate=validate.Range(min=0, min_inclusive=False))

    @post_load
    def _build(self, data, **kwargs):
        return Timeouts(**data)


class ResourcesSchema(StrictSchema):
    gpus = Gpus(load_default=None)
    memory = Size(load_default=None)
    cpus = fields.Float(load_default=None, validate=validate.Range(min=0, min_inclusive=False))
    shm_size = Size(load_default=None)

    @post_load
    def _build(self, data, **kwargs):
        return Resources(**data)


class ServiceSchema(StrictSchema):
    type = fields.String(required=True, validate=validate.OneOf(list(SERVICE_TYPES)))
    image = fields.String(required=True, validate=validate.Regexp(
        r"\S+\Z", error="Must be a non-empty image name without spaces."))
    port = Int(required=True, validate=PORT_RANGE)
    container_port = Int(validate=PORT_RANGE)  # default from SERVICE_TYPES
    args = fields.List(Text(), load_default=())
    volumes = fields.List(VolumeSpec(), load_default=())
    environment = KeyedDict(ENV_NAME, ENV_NAME_ERROR, Text(), load_default=dict)
    resources = fields.Nested(ResourcesSchema, load_default=Resources())
    health_path = fields.String(validate=validate.Regexp(
        r"/\S*\Z", error="Must be a path starting with '/'."))  # default from SERVICE_TYPES
    timeouts = fields.Nested(TimeoutsSchema, load_default=Timeouts())
    stop_timeout = fields.Float(load_default=10.0, validate=validate.Range(min=0))
    max_body_size = ByteSize(load_default=None)
    aliases = ModelNames(load_default=())
    model_name = fields.String(load_default=None, validate=validate.Regexp(MODEL_NAME, error=MODEL_NAME_ERROR))
    autostart = fields.Boolean(load_default=False)
    start_timeout = Duration(load_default=300.0, validate=validate.Range(min=0, min_inclusive=False))
    idle_timeout = Duration(load_default=None, validate=validate.Range(min=0, min_inclusive=False))
    group = fields.String(load_default=None, validate=validate.Regexp(GROUP_NAME, error=GROUP_NAME_ERROR))
    max_concurrent = Int(load_default=None, validate=validate.Range(min=1))
    max_queue = Int(load_default=None, validate=validate.Range(min=0))
    drain_timeout = Duration(load_default=60.0, validate=validate.Range(min=0))

    @validates_schema(skip_on_field_errors=False, pass_original=True)
    def _queue_needs_a_limit(self, data, original_data, **kwargs):
        """max_queue sizes max_concurrent's queue: alone it means nothing. Checked on the
        input, so a max_concurrent that failed to load does not also make this an error."""
        if data.get("max_queue") is not None and _get(original_data, "max_concurrent") is None:
            raise ValidationError("Needs max_concurrent.", "max_queue")

    @post_load
    def _fill_in(self, data, **kwargs):
        """The keyword arguments of ServiceConfig except `id` (the key, known one level up)."""
        for name, default in SERVICE_TYPES[data["type"]].items():
            data.setdefault(name, default)
        data["args"] = tuple(data["args"])
        data["volumes"] = tuple(data["volumes"])
        data["environment"] = tuple(sorted(data["environment"].items()))
        return data  # ServiceConfig fills in max_queue's default


class ServerSchema(StrictSchema):
    host = fields.String(load_default="127.0.0.1", validate=validate.Regexp(
        r"\S+\Z", error="Must be a host name or IP address."))
    port = Int(load_default=11000, validate=PORT_RANGE)
    log_level = LogLevel(load_default="INFO")
    container_prefix = fields.String(load_default="inference-proxy", validate=validate.Regexp(
        r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}\Z",
        error="Must be 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit."))
    admin_token = Token(load_default=None)
    api_keys = fields.List(Token(), load_default=())

    @post_load
    def _build(self, data, **kwargs):
        return ServerConfig(**{**data, "api_keys": tuple(data["api_keys"])})


class GroupSchema(StrictSchema):
    exclusive = fields.Boolean(load_default=False)


class ConfigSchema(StrictSchema):
    server = fields.Nested(ServerSchema, load_default=ServerConfig())
    groups = KeyedDict(GROUP_NAME, GROUP_NAME_ERROR, fields.Nested(GroupSchema, allow_none=True),
                       load_default=dict)  # a null group: all defaults
    services = KeyedDict(SERVICE_ID, SERVICE_ID_ERROR, fields.Nested(ServiceSchema), load_default=dict)

    @validates_schema(skip_on_field_errors=False)
    def _ports_are_free(self, data, **kwargs):
        """Each service needs its own host port, and not the proxy's. Runs even when other
        fields failed (on whatever did load), so these errors come with the rest."""
        server_port = _get(data.get("server"), "port")
        users: dict[int, str] = {}
        errors = {}
        for service_id, service in (data.get("services") or {}).items():
            port = _get(service, "port")
            if port is None:
                continue
            if port == server_port:
                errors[service_id] = {"port": [f"Port {port} is the proxy's own port (server.port)."]}
            elif port in users:
                errors[service_id] = {"port": [f"Port {port} is already used by service '{users[port]}'."]}
            else:
                users[port] = service_id
        if errors:
            raise ValidationError({"services": errors})

    @validates_schema(skip_on_field_errors=False)
    def _model_names_are_unique(self, data, **kwargs):
        """A model name routes to one service: aliases are unique across all services and
        are not service ids. The first use in file order keeps it; later ones are errors."""
        services = data.get("services") or {}
        users: dict[str, str] = {}
        errors: dict = {}
        for service_id, service in services.items():
            for index, alias in enumerate(_get(service, "aliases") or ()):
                if alias is None:
                    continue  # failed its own validation
                if alias in services:
                    message = f"Alias '{alias}' is the id of service '{alias}'."
                elif alias in users:
                    message = f"Alias '{alias}' is already used by service '{users[alias]}'."
                else:
                    users[alias] = service_id
                    continue
                errors.setdefault(service_id, {"aliases": {}})["aliases"][index] = [message]
        if errors:
            raise ValidationError({"services": errors})

    @validates_schema(skip_on_field_errors=False)
    def _groups_exist(self, data, **kwargs):
        if "groups" not in data:
            return  # `groups` itself is broken: already reported
        errors = {}
        for service_id, service in (data.get("services") or {}).items():
            group = _get(service, "group")
            if group is not None and group not in data["groups"]:
                errors[service_id] = {"group": [f"Unknown group '{group}'; define it under groups."]}
        if errors:
            raise ValidationError({"services": errors})

    @post_load
    def _build(self, data, **kwargs):
        services = {sid: ServiceConfig(id=sid, **kw) for sid, kw in data["services"].items()}
        groups = {name: GroupConfig(name=name, **(settings or {})) for name, settings in data["groups"].items()}
        return data["server"], services, groups


def _get(loaded, name):
    """A field of a loaded dataclass, or of the partial dict marshmallow keeps on errors."""
    if isinstance(loaded, Mapping):
        return loaded.get(name)
    return getattr(loaded, name, None)


# ---------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (YAML would silently keep the last one)."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first_line: dict[tuple, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<` merges may legitimately repeat and be overridden
            key = (key_node.tag, key_node.value)
            if key in first_line:
                raise yaml.composer.ComposerError(
                    None, None, f"Duplicate key {_show(key_node.value)} (first defined on line "
                    f"{first_line[key]}).", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return node

    def construct_object(self, node, deep=False):
        # Constructors can fail with plain exceptions (`!!int 0x`, a 5000-digit number);
        # give them the node's position like any other YAML error.
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:
            raise yaml.constructor.ConstructorError(None, None, str(exc), node.start_mark) from exc


# No date fields in the config: keep `2024-01-01` as the text the user wrote.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _parse_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and problem.startswith("but "):  # "but found another document"
            problem = f"{exc.context}, {problem}"
        problem = " ".join(problem.split())  # one line
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{source}: {where}{problem}"]) from None
    except yaml.reader.ReaderError as exc:  # e.g. a control character; no mark, a position
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        problem = str(exc).splitlines()[0]
        raise ConfigError([f"{source}: line {line}, column {column}: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: {' '.join(str(exc).split())}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: The document is nested too deeply."]) from None


# ---------------------------------------------------------------- loading


def load_config_text(text: str, source: str = DEFAULT_CONFIG_PATH,
                     environ: Mapping[str, str] | None = None) -> Config:
    """Parse and validate config text. Raises ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    log_level = (environ.get("PROXY_LOG_LEVEL") or "").upper()  # empty counts as unset
    env_errors = [LOG_LEVEL_ERROR] if log_level and log_level not in LOG_LEVELS else []
    try:
        server, services, groups = _load_document(text, source, environ)
    except ConfigError as exc:
        raise ConfigError(exc.errors + env_errors) from None
    if env_errors:
        raise ConfigError(env_errors)
    if log_level:
        server = dataclasses.replace(server, log_level=log_level)
    return Config(server=server, services=types.MappingProxyType(services), source=source,
                  groups=types.MappingProxyType(groups))


def _load_document(text: str, source: str, environ: Mapping[str, str]):
    """-> (ServerConfig, {id: ServiceConfig}, {name: GroupConfig}), or ConfigError with the
    file's problems."""
    document = _parse_yaml(text, source)
    if document is None:  # an empty file: all defaults
        document = {}
    if not isinstance(document, dict):
        raise ConfigError([f"{source}: The top level must be a mapping with 'server' and 'services'."])
    document, expansion_problems = expand_tree(document, environ)
    problems = [(tuple(map(str, path)), message) for path, message in expansion_problems]
    try:
        loaded = ConfigSchema().load(document)
    except ValidationError as exc:
        problems = _merge_problems(problems, list(_flatten(exc.messages)))
    if problems:
        raise ConfigError([f"{source}: {_format_path(path)}{message}"
                           for path, message in sorted(problems, key=_path_order)])
    return loaded


def load_config(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> Config:
    """Read and load a config file. Raises ConfigError (also when the file can't be read)."""
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: tolerate a BOM from Windows editors
            text = file.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ConfigError([f"{path}: cannot read config: {reason}"]) from None
    return load_config_text(text, source=str(path), environ=environ)


def config_path(cli_value: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The config file to use: --config, else $PROXY_CONFIG, else ./config.yaml."""
    environ = os.environ if environ is None else environ
    return cli_value or environ.get("PROXY_CONFIG") or DEFAULT_CONFIG_PATH


def _merge_problems(expansion: list, schema: list) -> list:
    """A value that failed to expand was validated as "" (to find the other problems): its
    own schema errors are noise. "Unknown field." wins over expansion errors inside it."""
    unexpanded = {path for path, _ in expansion}
    unknown = {path for path, message in schema if message == UNKNOWN_FIELD}
    expansion = [(path, message) for path, message in expansion
                 if not any(path[:n] in unknown for n in range(1, len(path) + 1))]
    schema = [(path, message) for path, message in schema
              if path not in unexpanded or message == UNKNOWN_FIELD]
    return expansion + schema


def _flatten(messages, path: tuple = ()):
    """marshmallow's nested error dict -> [(path, message)]; "_schema" means the path itself."""
    if isinstance(messages, dict):
        for key, sub in messages.items():
            yield from _flatten(sub, path if key == "_schema" else path + (str(key),))
    elif isinstance(messages, (list, tuple)):
        for message in messages:
            yield from _flatten(message, path)
    else:
        yield path, str(messages)


def _path_order(problem):
    """Sort by key path; list indices numerically (volumes.2 before volumes.10)."""
    return [(0, len(c), c) if c.isascii() and c.isdigit() else (1, 0, c) for c in problem[0]]


def _format_path(path: tuple) -> str:
    return f"{'.'.join(map(_show_key, path))}: " if path else ""


def _show_key(key: str) -> str:
    return key if key.isprintable() else _show(key)


def _show(text: str) -> str:
    """Quote text for a one-line message (keys can hold newlines)."""
    return repr(text) if not text.isprintable() else f"'{text}'"
