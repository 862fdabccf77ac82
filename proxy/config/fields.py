"""marshmallow fields for the config's value forms: sizes, durations, GPUs, volumes, tokens,
model names, and mappings whose errors sit under the user's own keys."""
from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping

from marshmallow import ValidationError, fields, validate

from .model import LOG_LEVELS, Volume

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
HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*)(\.[a-z0-9_-]+)*\Z")  # a DNS name or an IPv4 address
HOST_ERROR = "Must be a host name or IP address without a port, or '*'."
ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[a-z0-9_][a-z0-9_.-]*)(:[0-9]{1,5})?\Z")
ORIGIN_ERROR = "Must be an origin like 'http://localhost:3000' (scheme, host, optional port; no path), or '*'."
PROXY_ADDRESS_ERROR = "Must be an IP address or a network such as 10.0.0.0/8 (no host bits set)."
UNKNOWN_FIELD = "Unknown field."
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


def normal_host(text: str) -> str | None:
    """A host as the proxy compares them: lower case, no trailing dot, IPv6 without brackets
    and compressed ("[0:0::1]" -> "::1"); None when it is neither a name nor an address."""
    host = text.strip().lower().rstrip(".")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed or ":" in host:  # only IPv6 addresses hold a colon once the port is gone
        try:
            return ipaddress.IPv6Address(host[1:-1] if bracketed else host).compressed
        except ValueError:
            return None
    return host if HOST_NAME.match(host) else None


class HostName(fields.String):
    """An entry of ``server.allowed_hosts``: a host name or an IP address, or "*"."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        host = "*" if text.strip() == "*" else normal_host(text)
        if host is None:
            raise ValidationError(HOST_ERROR)
        return host


class Origin(fields.String):
    """An entry of ``server.cors_origins``: "*" or scheme://host[:port], written the way
    browsers send it in the Origin header (lower case, no default port, no slash)."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs).strip().lower().rstrip("/")
        if text == "*":
            return text
        match = ORIGIN.match(text)
        if match is None or (match[3] and not 1 <= int(match[3][1:]) <= 65535):
            raise ValidationError(ORIGIN_ERROR)
        scheme, host, port = match.groups()
        if port in ({"http": ":80", "https": ":443"}[scheme], None):
            port = ""
        return f"{scheme}://{host}{port}"
class ProxyAddress(Text):
    """An IP address or network (CIDR, without host bits: 10.0.0.0/8), as gunicorn's
    forwarded_allow_ips takes it."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            ipaddress.ip_network(text)
        except ValueError:
            raise ValidationError(PROXY_ADDRESS_ERROR) from None
        return text


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
