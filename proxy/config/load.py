"""Read ``config.yaml`` into a ``Config``, or a ``ConfigError`` listing every problem.

Pure: PyYAML, marshmallow and the standard library only (no docker, flask, loguru), so it
can be imported and tested anywhere.

Pipeline (``load_config_text``):
  1. parse YAML with a safe loader that rejects duplicate keys and keeps dates as text;
  2. expand ``${VAR}`` / ``${VAR:-default}`` in string values (see ``envsubst``);
  3. validate with the marshmallow schemas (``unknown = RAISE`` everywhere, so typos fail);
  4. apply ``PROXY_LOG_LEVEL``.
Every problem is reported at once, one line each: ``"<source>: <dotted.key.path>: <message>"``,
sorted by key path. No input, however malformed, gives anything but a ``Config`` or a
``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping

import yaml
from marshmallow import ValidationError

from .envsubst import expand_tree
from .fields import UNKNOWN_FIELD
from .model import LOG_LEVELS, Config, ConfigError, text_digest
from .schema import ConfigSchema

DEFAULT_CONFIG_PATH = "config.yaml"
LOG_LEVEL_ERROR = f"PROXY_LOG_LEVEL: Must be one of: {', '.join(LOG_LEVELS)}."

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
        server, services, groups, engines, expanded = _load_document(text, source, environ)
    except ConfigError as exc:
        raise ConfigError(exc.errors + env_errors) from None
    if env_errors:
        raise ConfigError(env_errors)
    if log_level:
        server = dataclasses.replace(server, log_level=log_level)
    return Config(server=server, services=types.MappingProxyType(services), source=source,
                  groups=types.MappingProxyType(groups), engines=types.MappingProxyType(engines),
                  expanded_values=frozenset(expanded),
                  digest=text_digest(text))


def _load_document(text: str, source: str, environ: Mapping[str, str]):
    """-> (ServerConfig, {id: ServiceConfig}, {name: GroupConfig}, {name: EngineConfig},
    {values from ${VAR}}), or
    ConfigError with the file's problems."""
    document = _parse_yaml(text, source)
    if document is None:  # an empty file: all defaults
        document = {}
    if not isinstance(document, dict):
        raise ConfigError([f"{source}: The top level must be a mapping with 'server' and 'services'."])
    document, expansion_problems, expanded = expand_tree(document, environ)
    problems = [(tuple(map(str, path)), message) for path, message in expansion_problems]
    try:
        loaded = ConfigSchema().load(document)
    except ValidationError as exc:
        problems = _merge_problems(problems, list(_flatten(exc.messages)))
    if problems:
        raise ConfigError([f"{source}: {_format_path(path)}{message}"
                           for path, message in sorted(problems, key=_path_order)])
    return (*loaded, expanded)


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
