"""marshmallow schemas for the config file, with the checks that span fields and services.

Unknown keys are errors everywhere. A key that is left out is left out of the loaded data
too, so the dataclasses in ``model.py`` fill in their defaults: no default is written here.
"""
from __future__ import annotations

from collections.abc import Mapping

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, pre_load, validate, validates_schema

from .fields import (ENV_NAME, ENV_NAME_ERROR, GROUP_NAME, GROUP_NAME_ERROR, MODEL_NAME, MODEL_NAME_ERROR,
                     PORT_RANGE, SERVICE_ID, SERVICE_ID_ERROR, UNKNOWN_FIELD, ByteSize, Duration, Gpus, HostName,
                     Int, KeyedDict, LogLevel, ModelNames, Origin, ProxyAddress, Size, Text, Token, VolumeSpec)
from .model import (PULL_POLICIES, SERVICE_TYPES, GroupConfig, RegistryAuth, Resources, ServerConfig, ServiceConfig,
                    Timeouts)

class StrictSchema(Schema):
    """Unknown keys are errors; an explicit null in an optional key means "the default"
    (so an empty `resources:` or `server:` section is fine), except in a key that allows
    null, where it means "off" (``metrics_path: null``)."""

    error_messages = {"type": "Not a valid mapping type.", "unknown": UNKNOWN_FIELD}

    class Meta:
        unknown = RAISE

    @pre_load
    def _null_means_default(self, data, **kwargs):
        if not isinstance(data, Mapping):
            return data  # marshmallow reports the wrong type
        return {key: value for key, value in data.items()
                if value is not None or key not in self.load_fields or self.load_fields[key].required
                or self.load_fields[key].allow_none}


class TimeoutsSchema(StrictSchema):
    connect = fields.Float(validate=validate.Range(min=0, min_inclusive=False))
    read = fields.Float(validate=validate.Range(min=0, min_inclusive=False))

    @post_load
    def _build(self, data, **kwargs):
        return Timeouts(**data)


class ResourcesSchema(StrictSchema):
    gpus = Gpus()
    memory = Size()
    cpus = fields.Float(validate=validate.Range(min=0, min_inclusive=False))
    shm_size = Size()

    @post_load
    def _build(self, data, **kwargs):
        return Resources(**data)


class RegistryAuthSchema(StrictSchema):
    username = Text(required=True, validate=validate.Length(min=1))
    password = Text(required=True, validate=validate.Length(min=1))

    @post_load
    def _build(self, data, **kwargs):
        return RegistryAuth(**data)


class ServiceSchema(StrictSchema):
    type = fields.String(required=True, validate=validate.OneOf(list(SERVICE_TYPES)))
    image = fields.String(required=True, validate=validate.Regexp(
        r"\S+\Z", error="Must be a non-empty image name without spaces."))
    port = Int(required=True, validate=PORT_RANGE)
    container_port = Int(validate=PORT_RANGE)  # default from SERVICE_TYPES
    args = fields.List(Text())
    volumes = fields.List(VolumeSpec())
    environment = KeyedDict(ENV_NAME, ENV_NAME_ERROR, Text())
    resources = fields.Nested(ResourcesSchema)
    health_path = fields.String(validate=validate.Regexp(
        r"/\S*\Z", error="Must be a path starting with '/'."))  # default from SERVICE_TYPES
    metrics_path = fields.String(allow_none=True, validate=validate.Regexp(
        r"/\S*\Z", error="Must be a path starting with '/', or null."))  # default from SERVICE_TYPES
    timeouts = fields.Nested(TimeoutsSchema)
    stop_timeout = fields.Float(validate=validate.Range(min=0))
    max_body_size = ByteSize()
    aliases = ModelNames()
    model_name = fields.String(validate=validate.Regexp(MODEL_NAME, error=MODEL_NAME_ERROR))
    autostart = fields.Boolean()
    start_timeout = Duration(validate=validate.Range(min=0, min_inclusive=False))
    idle_timeout = Duration(validate=validate.Range(min=0, min_inclusive=False))
    group = fields.String(validate=validate.Regexp(GROUP_NAME, error=GROUP_NAME_ERROR))
    max_concurrent = Int(validate=validate.Range(min=1))
    max_queue = Int(validate=validate.Range(min=0))
    drain_timeout = Duration(validate=validate.Range(min=0))
    pull_policy = fields.String(validate=validate.OneOf(PULL_POLICIES))
    registry_auth = fields.Nested(RegistryAuthSchema)

    @validates_schema(skip_on_field_errors=False, pass_original=True)
    def _queue_needs_a_limit(self, data, original_data, **kwargs):
        """max_queue sizes max_concurrent's queue: alone it means nothing. Checked on the
        input, so a max_concurrent that failed to load does not also make this an error."""
        if data.get("max_queue") is not None and _get(original_data, "max_concurrent") is None:
            raise ValidationError("Needs max_concurrent.", "max_queue")

    @post_load
    def _fill_in(self, data, **kwargs):
        """The keyword arguments of ServiceConfig except `id` (the key, known one level up)."""
        for name in ("args", "volumes"):
            if name in data:
                data[name] = tuple(data[name])
        if "environment" in data:
            data["environment"] = tuple(sorted(data["environment"].items()))
        return data  # ServiceConfig fills in the defaults


class ServerSchema(StrictSchema):
    host = fields.String(validate=validate.Regexp(
        r"\S+\Z", error="Must be a host name or IP address."))
    port = Int(validate=PORT_RANGE)
    log_level = LogLevel()
    container_prefix = fields.String(validate=validate.Regexp(
        r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}\Z",
        error="Must be 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit."))
    admin_token = Token()
    api_keys = fields.List(Token())
    allowed_hosts = fields.List(HostName())
    cors_origins = fields.List(Origin())
    body_timeout = Duration(validate=validate.Range(min=0, min_inclusive=False))
    max_json_body = ByteSize(validate=validate.Range(min=1))
    max_buffered = ByteSize(validate=validate.Range(min=1))
    trusted_proxies = fields.List(ProxyAddress())

    @validates_schema(skip_on_field_errors=True)
    def _one_body_fits_the_budget(self, data, **kwargs):
        """A body the front door takes must fit in what a worker may hold, or it could never pass."""
        defaults = ServerConfig()
        largest = data.get("max_json_body", defaults.max_json_body)
        if data.get("max_buffered", defaults.max_buffered) < largest:
            raise ValidationError(f"Must be at least server.max_json_body ({largest} bytes).", "max_buffered")

    @post_load
    def _build(self, data, **kwargs):
        for name in ("api_keys", "allowed_hosts", "cors_origins", "trusted_proxies"):
            if name in data:
                data[name] = tuple(data[name])
        return ServerConfig(**data)


class GroupSchema(StrictSchema):
    exclusive = fields.Boolean()


class ConfigSchema(StrictSchema):
    server = fields.Nested(ServerSchema)
    groups = KeyedDict(GROUP_NAME, GROUP_NAME_ERROR, fields.Nested(GroupSchema, allow_none=True))  # null: defaults
    services = KeyedDict(SERVICE_ID, SERVICE_ID_ERROR, fields.Nested(ServiceSchema))

    @validates_schema(skip_on_field_errors=False)
    def _ports_are_free(self, data, **kwargs):
        """Each service needs its own host port, and not the proxy's. Runs even when other
        fields failed (on whatever did load), so these errors come with the rest."""
        server_port = _get(data.get("server") or ServerConfig(), "port")
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

    @validates_schema(skip_on_field_errors=False, pass_original=True)
    def _groups_exist(self, data, original_data, **kwargs):
        if "groups" not in data and _get(original_data, "groups") is not None:
            return  # `groups` itself is broken: already reported
        groups = data.get("groups") or {}
        errors = {}
        for service_id, service in (data.get("services") or {}).items():
            group = _get(service, "group")
            if group is not None and group not in groups:
                errors[service_id] = {"group": [f"Unknown group '{group}'; define it under groups."]}
        if errors:
            raise ValidationError({"services": errors})

    @post_load
    def _build(self, data, **kwargs):
        services = {sid: ServiceConfig(id=sid, **kw) for sid, kw in data.get("services", {}).items()}
        groups = {name: GroupConfig(name=name, **(settings or {})) for name, settings in data.get("groups", {}).items()}
        return data.get("server") or ServerConfig(), services, groups


def _get(loaded, name):
    """A field of a loaded dataclass, or of the partial dict marshmallow keeps on errors."""
    if isinstance(loaded, Mapping):
        return loaded.get(name)
    return getattr(loaded, name, None)
