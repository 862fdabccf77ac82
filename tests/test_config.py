"""Tests for proxy.config: loading, defaults, every validation message, and fuzzing."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import (
    Config,
    ConfigError,
    GroupConfig,
    Resources,
    ServerConfig,
    ServiceConfig,
    Timeouts,
    Volume,
    config_path,
    load_config,
    load_config_text,
    parse_duration,
    parse_size,
)
from proxy.config.envsubst import expand

FULL_EXAMPLE = """\
server:
  host: 127.0.0.1          # default 127.0.0.1
  port: 11000              # default 11000
  log_level: INFO          # DEBUG | INFO | WARNING | ERROR; env PROXY_LOG_LEVEL overrides
services:
  llama3:                  # service id
    type: llama-cpp-server # the only type for now
    image: ghcr.io/ggml-org/llama.cpp:server-cuda
    port: 8081             # host port, published on 127.0.0.1; the proxy forwards here
    container_port: 8080   # default per type (llama-cpp-server: 8080)
    args: ["-m", "/models/llama3-8b.Q4_K_M.gguf", "--host", "0.0.0.0", "--port", "8080", "-ngl", "99"]
    volumes:               # docker-style "HOST:CONTAINER[:ro|rw]", absolute paths
      - /srv/models:/models:ro
    environment:
      LLAMA_ARG_CTX_SIZE: "8192"
      HF_TOKEN: ${HF_TOKEN}          # ${VAR} and ${VAR:-default} are expanded
    resources:
      gpus: all
      memory: 16g
      cpus: 4
      shm_size: 1g
    health_path: /health
    timeouts:
      connect: 5
      read: 600
    stop_timeout: 10
"""

LLAMA3 = ServiceConfig(
    id="llama3",
    type="llama-cpp-server",
    image="ghcr.io/ggml-org/llama.cpp:server-cuda",
    port=8081,
    container_port=8080,
    args=("-m", "/models/llama3-8b.Q4_K_M.gguf", "--host", "0.0.0.0", "--port", "8080", "-ngl", "99"),
    volumes=(Volume("/srv/models", "/models", "ro"),),
    environment=(("HF_TOKEN", "hf_abc"), ("LLAMA_ARG_CTX_SIZE", "8192")),
    resources=Resources(gpus="all", memory="16g", cpus=4.0, shm_size="1g"),
    health_path="/health",
    timeouts=Timeouts(connect=5.0, read=600.0),
    stop_timeout=10.0,
)

MINIMAL_SERVICE = "    type: llama-cpp-server\n    image: img\n"
REPO_ROOT = Path(__file__).resolve().parents[1]


def load(text: str, **environ) -> Config:
    return load_config_text(textwrap.dedent(text), environ=environ)


def errors_of(text: str, **environ) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, **environ)
    return info.value.errors


def service(body: str = "", service_id: str = "a", port: int | str = 8081, image: str = "img") -> str:
    """A one-service document; `body` holds extra keys indented for the service."""
    return f"services:\n  {service_id}:\n    type: llama-cpp-server\n    image: {image}\n    port: {port}\n{body}"


# ---------------------------------------------------------------- loading


def test_full_example_loads_into_the_expected_dataclasses():
    config = load_config_text(FULL_EXAMPLE, environ={"HF_TOKEN": "hf_abc"})
    assert config == Config(
        server=ServerConfig(host="127.0.0.1", port=11000, log_level="INFO"),
        services={"llama3": LLAMA3},
        source="config.yaml",
    )


def test_to_dict_is_plain_json():
    data = LLAMA3.to_dict()
    assert json.loads(json.dumps(data)) == data  # lists and dicts only, no tuples
    assert data["environment"] == {"HF_TOKEN": "hf_abc", "LLAMA_ARG_CTX_SIZE": "8192"}
    assert data["volumes"] == [{"host_path": "/srv/models", "container_path": "/models", "mode": "ro"}]
    assert data["resources"] == {"gpus": "all", "memory": "16g", "cpus": 4.0, "shm_size": "1g"}
    assert data["timeouts"] == {"connect": 5.0, "read": 600.0}


def test_to_dict_lists_gpu_device_ids():
    config = load(service("    resources: {gpus: [0, '2']}\n"))
    assert config.services["a"].to_dict()["resources"]["gpus"] == ["0", "2"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "server:\nservices:\n", "services: {}\n", "server: {}\n"])
def test_empty_documents_give_all_defaults(text):
    config = load(text)
    assert config.server == ServerConfig(host="127.0.0.1", port=11000, log_level="INFO")
    assert dict(config.services) == {}


def test_service_defaults_come_from_its_type():
    config = load(service())
    assert config.services["a"] == ServiceConfig(
        id="a", type="llama-cpp-server", image="img", port=8081, container_port=8080,
        args=(), volumes=(), environment=(), resources=Resources(gpus=None, memory=None, cpus=None, shm_size=None),
        health_path="/health", timeouts=Timeouts(connect=5.0, read=600.0), stop_timeout=10.0,
    )


def test_metrics_path_defaults_per_type_and_null_turns_it_off():
    assert load(service()).services["a"].metrics_path == "/metrics"
    assert load(service("    metrics_path: /stats/prometheus\n")).services["a"].metrics_path == "/stats/prometheus"
    assert load(service("    metrics_path: null\n")).services["a"].metrics_path is None
    assert load(service("    metrics_path:\n")).services["a"].metrics_path is None


def test_null_optional_sections_mean_defaults():
    config = load(service("    args:\n    volumes:\n    environment:\n    resources:\n    timeouts:\n"
                          "    container_port:\n    health_path:\n    stop_timeout:\n"))
    assert config.services["a"] == load(service()).services["a"]


def test_services_keep_file_order_and_are_read_only():
    config = load("services:\n" + "".join(
        f"  {sid}:\n{MINIMAL_SERVICE}    port: {port}\n" for sid, port in [("zeta", 9001), ("alpha", 9002), ("mid", 9003)]))
    assert list(config.services) == ["zeta", "alpha", "mid"]
    with pytest.raises(TypeError):
        config.services["new"] = config.services["zeta"]  # type: ignore[index]


@pytest.mark.parametrize("yaml_value, expected", [
    ('"8192"', "8192"), ("8192", "8192"), ("true", "true"), ("false", "false"), ("1.5", "1.5"),
    ("''", ""), ("2024-01-01", "2024-01-01"),  # dates stay as written
])
def test_environment_values_are_taken_as_text(yaml_value, expected):
    config = load(service(f"    environment:\n      X: {yaml_value}\n"))
    assert config.services["a"].environment == (("X", expected),)


def test_environment_is_sorted_by_name():
    config = load(service("    environment: {B: '1', A: '2', _c: '3'}\n"))
    assert config.services["a"].environment == (("A", "2"), ("B", "1"), ("_c", "3"))


def test_args_numbers_become_strings():
    config = load(service("    args: [-ngl, 99, --temp, 0.5, --flag, true]\n"))
    assert config.services["a"].args == ("-ngl", "99", "--temp", "0.5", "--flag", "true")


@pytest.mark.parametrize("yaml_value, expected", [
    ("all", "all"), ("ALL", "all"), ("1", 1), ("2", 2), ("'3'", 3),
    ('["0", "2"]', ("0", "2")), ("[0, 2]", ("0", "2")), ("[GPU-8f6a1b2c]", ("GPU-8f6a1b2c",)),
    ("null", None),
])
def test_good_gpus_forms_map_to_resources(yaml_value, expected):
    config = load(service(f"    resources:\n      gpus: {yaml_value}\n"))
    assert config.services["a"].resources.gpus == expected


@pytest.mark.parametrize("volume, expected", [
    ("/srv/models:/models", Volume("/srv/models", "/models", "rw")),
    ("/srv/models:/models:rw", Volume("/srv/models", "/models", "rw")),
    ("/srv/models:/models:ro", Volume("/srv/models", "/models", "ro")),
])
def test_good_volumes(volume, expected):
    assert load(service(f"    volumes: ['{volume}']\n")).services["a"].volumes == (expected,)


@pytest.mark.parametrize("size", ["16g", "16G", "16gb", "16GB", "512m", "1024k", "1.5g", "1073741824", "100b"])
def test_good_sizes_are_kept_as_written(size):
    resources = load(service(f"    resources: {{memory: {size}, shm_size: {size}}}\n")).services["a"].resources
    assert resources.memory == resources.shm_size == size


def test_numeric_strings_are_accepted_for_numbers_so_variables_work():
    config = load(service("    container_port: ${CPORT}\n    stop_timeout: ${STOP}\n", port="${PORT}"),
                  PORT="8081", CPORT="9000", STOP="2.5")
    assert (config.services["a"].port, config.services["a"].container_port) == (8081, 9000)
    assert config.services["a"].stop_timeout == 2.5


def test_yaml_merge_keys_are_not_duplicates():
    config = load("""\
        services:
          a: &base
            type: llama-cpp-server
            image: img
            port: 8081
          b:
            <<: *base
            image: other
            port: 8082
        """)
    assert (config.services["b"].type, config.services["b"].image) == ("llama-cpp-server", "other")


# ---------------------------------------------------------------- variables


@pytest.mark.parametrize("value, environ, expected", [
    ("${X}", {"X": "v"}, "v"),
    ("a-${X}-b", {"X": "v"}, "a-v-b"),
    ("${X}", {"X": ""}, ""),  # set but empty: fine
    ("${X:-d}", {}, "d"),
    ("${X:-d}", {"X": ""}, "d"),  # like the shell's :-, empty also takes the default
    ("${X:-d}", {"X": "v"}, "v"),
    ("${X:-}", {}, ""),
    ("${X:-a:b c}", {}, "a:b c"),
    ("$${X}", {"X": "v"}, "${X}"),  # escaped: literal
    ("$${X} ${X}", {"X": "v"}, "${X} v"),
    ("$X and $ and $$", {"X": "v"}, "$X and $ and $$"),  # only ${...} is special
])
def test_variable_expansion(value, environ, expected):
    assert expand(value, environ) == (expected, [])


@pytest.mark.parametrize("value", ["${}", "${1X}", "${X Y}", "${X", "${X:d}", "${X-d}"])
def test_invalid_variable_references_are_reported(value):
    assert expand(value, {"X": "v"})[1] == [
        "Invalid variable reference; use ${NAME} or ${NAME:-default} (write $${ for a literal ${)."]


def test_variables_in_the_document():
    config = load("services:\n  a:\n    type: llama-cpp-server\n    image: ${IMAGE:-fallback}\n"
                  "    port: 8081\n    environment: {A: '$${HOME}', B: '${B}'}\n", B="b-value")
    assert config.services["a"].image == "fallback"
    assert config.services["a"].environment == (("A", "${HOME}"), ("B", "b-value"))


def test_an_expanded_value_cannot_change_the_yaml_structure():
    config = load(service("    environment: {A: '${A}'}\n"), A="x\n  evil: [1, 2]: {")
    assert config.services["a"].environment == (("A", "x\n  evil: [1, 2]: {"),)


def test_keys_are_not_expanded():
    assert errors_of(service("    environment: {'${A}': x}\n"), A="OK") == [
        "config.yaml: services.a.environment.${A}: Environment variable names must match [A-Za-z_][A-Za-z0-9_]*."]


# ---------------------------------------------------------------- PROXY_LOG_LEVEL


@pytest.mark.parametrize("file_level, env_level, expected", [
    ("INFO", None, "INFO"), ("debug", None, "DEBUG"), ("INFO", "DEBUG", "DEBUG"),
    ("INFO", "warning", "WARNING"), ("ERROR", "", "ERROR"),  # empty: not set
])
def test_proxy_log_level_overrides_the_file(file_level, env_level, expected):
    environ = {} if env_level is None else {"PROXY_LOG_LEVEL": env_level}
    config = load(f"server: {{log_level: {file_level}}}\n", **environ)
    assert config.server.log_level == expected


def test_invalid_proxy_log_level_is_an_error_naming_the_variable():
    assert errors_of("server: {log_level: INFO}\n", PROXY_LOG_LEVEL="LOUD") == [
        "PROXY_LOG_LEVEL: Must be one of: DEBUG, INFO, WARNING, ERROR."]


def test_proxy_log_level_error_comes_with_the_file_errors():
    assert errors_of("server: {log_level: LOUD}\n", PROXY_LOG_LEVEL="LOUD") == [
        "config.yaml: server.log_level: Must be one of: DEBUG, INFO, WARNING, ERROR.",
        "PROXY_LOG_LEVEL: Must be one of: DEBUG, INFO, WARNING, ERROR.",
    ]


def test_proxy_log_level_error_comes_with_a_yaml_syntax_error():
    assert errors_of("server: [\n", PROXY_LOG_LEVEL="LOUD") == [
        "config.yaml: line 2, column 1: expected the node content, but found '<stream end>'",
        "PROXY_LOG_LEVEL: Must be one of: DEBUG, INFO, WARNING, ERROR.",
    ]


# ---------------------------------------------------------------- failures: exact messages

PORT_RANGE = "Must be greater than or equal to 1 and less than or equal to 65535."
GPUS = "Must be 'all', a positive count, or a list of device ids."
VOLUME = "Must be 'HOST:CONTAINER[:ro|rw]' with absolute paths."
SIZE = "Must be a size like '16g': a number with an optional b, k, m or g suffix."
SERVICE_ID = ("Service id must be 1-63 characters of lowercase letters, digits, '-', '_' or '.', "
              "starting with a letter or digit.")

FAILURES = {
    "bad_yaml_gives_line_and_column": (
        "server:\n  port: 11000\nservices:\n  a: [1, 2\n  b: 3\n",
        ["config.yaml: line 5, column 4: expected ',' or ']', but got ':'"]),
    "tab_indentation": (
        "server:\n\tport: 1\n",
        ["config.yaml: line 2, column 1: found character '\\t' that cannot start any token"]),
    "duplicate_key": (
        "server:\n  port: 1\n  host: h\n  port: 2\n",
        ["config.yaml: line 4, column 3: Duplicate key 'port' (first defined on line 2)."]),
    "duplicate_service": (
        service() + "  a:\n    image: x\n",
        ["config.yaml: line 6, column 3: Duplicate key 'a' (first defined on line 2)."]),
    "two_documents": (
        "server: {}\n---\nservices: {}\n",
        ["config.yaml: line 2, column 1: expected a single document in the stream, but found another document"]),
    "undefined_alias": (
        "server: *nope\n",
        ["config.yaml: line 1, column 9: found undefined alias 'nope'"]),
    "python_tag_is_not_constructed": (
        "server: !!python/object:os.system {}\n",
        ["config.yaml: line 1, column 9: could not determine a constructor for the tag "
         "'tag:yaml.org,2002:python/object:os.system'"]),
    "bad_explicit_int": (
        "server: {port: !!int 0x}\n",
        ["config.yaml: line 1, column 16: invalid literal for int() with base 16: ''"]),
    "control_character": (
        "server:\n  host: a\x01\n",
        ["config.yaml: line 2, column 10: unacceptable character #x0001: special characters are not allowed"]),
    "top_level_list": (
        "- server\n- services\n",
        ["config.yaml: The top level must be a mapping with 'server' and 'services'."]),
    "top_level_scalar": (
        "hello\n",
        ["config.yaml: The top level must be a mapping with 'server' and 'services'."]),
    "services_not_a_mapping": (
        "services: [a, b]\n",
        ["config.yaml: services: Not a valid mapping type."]),
    "service_not_a_mapping": (
        "services:\n  a: llama\n",
        ["config.yaml: services.a: Not a valid mapping type."]),
    "unknown_top_level_key": (
        "servcies: {}\n",
        ["config.yaml: servcies: Unknown field."]),
    "unknown_service_key": (
        service("    imgae: x\n", service_id="llama3"),
        ["config.yaml: services.llama3.imgae: Unknown field."]),
    "unknown_nested_key": (
        service("    resources: {gpu: all}\n    timeouts: {write: 1}\n"),
        ["config.yaml: services.a.resources.gpu: Unknown field.",
         "config.yaml: services.a.timeouts.write: Unknown field."]),
    "missing_port": (
        "services:\n  myservice:\n" + MINIMAL_SERVICE,
        ["config.yaml: services.myservice.port: Missing data for required field."]),
    "missing_everything": (
        "services:\n  a: {}\n",
        ["config.yaml: services.a.image: Missing data for required field.",
         "config.yaml: services.a.port: Missing data for required field.",
         "config.yaml: services.a.type: Missing data for required field."]),
    "null_required_field": (
        "services:\n  a:\n    type: llama-cpp-server\n    image:\n    port: 1\n",
        ["config.yaml: services.a.image: Field may not be null."]),
    "unknown_type_lists_the_allowed_ones": (
        "services:\n  a:\n    type: vllm\n    image: i\n    port: 8081\n",
        ["config.yaml: services.a.type: Must be one of: llama-cpp-server."]),
    "port_zero": (service(port=0), [f"config.yaml: services.a.port: {PORT_RANGE}"]),
    "port_too_big": (service(port=65536), [f"config.yaml: services.a.port: {PORT_RANGE}"]),
    "port_huge": (service(port=10**40), [f"config.yaml: services.a.port: {PORT_RANGE}"]),
    "port_bool": (service(port="true"), ["config.yaml: services.a.port: Not a valid integer."]),
    "port_float": (service(port="8081.5"), ["config.yaml: services.a.port: Not a valid integer."]),
    "port_text": (service(port="http"), ["config.yaml: services.a.port: Not a valid integer."]),
    "container_port_out_of_range": (
        service("    container_port: 70000\n"), [f"config.yaml: services.a.container_port: {PORT_RANGE}"]),
    "server_port_out_of_range": (
        "server: {port: -1}\n", [f"config.yaml: server.port: {PORT_RANGE}"]),
    "server_log_level": (
        "server: {log_level: TRACE}\n",
        ["config.yaml: server.log_level: Must be one of: DEBUG, INFO, WARNING, ERROR."]),
    "duplicate_ports": (
        "services:\n  a:\n" + MINIMAL_SERVICE + "    port: 8081\n"
        "  b:\n" + MINIMAL_SERVICE + "    port: 8081\n"
        "  c:\n" + MINIMAL_SERVICE + "    port: 8081\n",
        ["config.yaml: services.b.port: Port 8081 is already used by service 'a'.",
         "config.yaml: services.c.port: Port 8081 is already used by service 'a'."]),
    "proxy_own_port": (
        service(port=11000),
        ["config.yaml: services.a.port: Port 11000 is the proxy's own port (server.port)."]),
    "proxy_own_port_when_changed": (
        "server: {port: 9000}\n" + service(port=9000),
        ["config.yaml: services.a.port: Port 9000 is the proxy's own port (server.port)."]),
    "bad_service_id": (
        service(service_id="Bad Id"), [f"config.yaml: services.Bad Id: {SERVICE_ID}"]),
    "service_id_dots_only": (
        service(service_id="'..'"), [f"config.yaml: services...: {SERVICE_ID}"]),
    "service_id_too_long": (
        service(service_id="a" * 64), [f"config.yaml: services.{'a' * 64}: {SERVICE_ID}"]),
    "service_id_number": (
        service(service_id="1"), [f"config.yaml: services.1: {SERVICE_ID}"]),
    "gpus_zero": (service("    resources: {gpus: 0}\n"), [f"config.yaml: services.a.resources.gpus: {GPUS}"]),
    "gpus_negative": (service("    resources: {gpus: -1}\n"), [f"config.yaml: services.a.resources.gpus: {GPUS}"]),
    "gpus_bool": (service("    resources: {gpus: true}\n"), [f"config.yaml: services.a.resources.gpus: {GPUS}"]),
    "gpus_word": (service("    resources: {gpus: some}\n"), [f"config.yaml: services.a.resources.gpus: {GPUS}"]),
    "gpus_empty_list": (service("    resources: {gpus: []}\n"), [f"config.yaml: services.a.resources.gpus: {GPUS}"]),
    "gpus_list_of_junk": (
        service("    resources: {gpus: ['0,1', '']}\n"), [f"config.yaml: services.a.resources.gpus: {GPUS}"]),
    "gpus_mapping": (
        service("    resources: {gpus: {count: 1}}\n"), [f"config.yaml: services.a.resources.gpus: {GPUS}"]),
    "gpus_float": (service("    resources: {gpus: 1.5}\n"), [f"config.yaml: services.a.resources.gpus: {GPUS}"]),
    "bad_volumes": (
        service("    volumes: [/a:/b, models:/models, /a:models, '/a:/b:rx', '/a', 5, '/a:/b:ro:x']\n"),
        [f"config.yaml: services.a.volumes.{i}: {VOLUME}" for i in range(1, 7)]),
    "volumes_not_a_list": (
        service("    volumes: /a:/b\n"), ["config.yaml: services.a.volumes: Not a valid list."]),
    "bad_memory": (service("    resources: {memory: 16 GB}\n"), [f"config.yaml: services.a.resources.memory: {SIZE}"]),
    "bad_memory_unit": (service("    resources: {memory: 16t}\n"), [f"config.yaml: services.a.resources.memory: {SIZE}"]),
    "memory_with_trailing_newline": (
        service('    resources: {memory: "16g\\n"}\n'), [f"config.yaml: services.a.resources.memory: {SIZE}"]),
    "health_path_with_trailing_newline": (
        service('    health_path: "/health\\n"\n'),
        ["config.yaml: services.a.health_path: Must be a path starting with '/'."]),
    "image_empty": (
        service(image="''"), ["config.yaml: services.a.image: Must be a non-empty image name without spaces."]),
    "bad_shm_size": (service("    resources: {shm_size: -1g}\n"), [f"config.yaml: services.a.resources.shm_size: {SIZE}"]),
    "cpus_zero": (service("    resources: {cpus: 0}\n"), ["config.yaml: services.a.resources.cpus: Must be greater than 0."]),
    "timeouts_not_positive": (
        service("    timeouts: {connect: 0, read: -1}\n"),
        ["config.yaml: services.a.timeouts.connect: Must be greater than 0.",
         "config.yaml: services.a.timeouts.read: Must be greater than 0."]),
    "timeout_infinite": (
        service("    timeouts: {read: .inf}\n"),
        ["config.yaml: services.a.timeouts.read: Special numeric values (nan or infinity) are not permitted."]),
    "stop_timeout_negative": (
        service("    stop_timeout: -1\n"),
        ["config.yaml: services.a.stop_timeout: Must be greater than or equal to 0."]),
    "health_path_relative": (
        service("    health_path: health\n"),
        ["config.yaml: services.a.health_path: Must be a path starting with '/'."]),
    "metrics_path_relative": (
        service("    metrics_path: metrics\n"),
        ["config.yaml: services.a.metrics_path: Must be a path starting with '/', or null."]),
    "metrics_path_not_text": (
        service("    metrics_path: false\n"), ["config.yaml: services.a.metrics_path: Not a valid string."]),
    "args_not_a_list": (service("    args: -m x\n"), ["config.yaml: services.a.args: Not a valid list."]),
    "args_nested": (service("    args: [[1]]\n"), ["config.yaml: services.a.args.0: Not a valid string."]),
    "bad_environment_names": (
        service("    environment: {1X: a, A-B: b, OK: [1]}\n"),
        ["config.yaml: services.a.environment.1X: Environment variable names must match [A-Za-z_][A-Za-z0-9_]*.",
         "config.yaml: services.a.environment.A-B: Environment variable names must match [A-Za-z_][A-Za-z0-9_]*.",
         "config.yaml: services.a.environment.OK: Not a valid string."]),
    "environment_null_value": (
        service("    environment: {A:}\n"), ["config.yaml: services.a.environment.A: Field may not be null."]),
    "unset_variable_names_variable_and_key": (
        service("    environment:\n      HF_TOKEN: ${HF_TOKEN}\n", service_id="llama3"),
        ["config.yaml: services.llama3.environment.HF_TOKEN: Environment variable 'HF_TOKEN' is not set "
         "(use ${HF_TOKEN:-default} for a default)."]),
    "unset_variable_is_not_also_a_type_error": (
        service(port="${PORT}"),
        ["config.yaml: services.a.port: Environment variable 'PORT' is not set (use ${PORT:-default} for a default)."]),
    "unset_variable_in_unknown_key_reports_the_key": (
        service("    imgae: ${IMAGE}\n"), ["config.yaml: services.a.imgae: Unknown field."]),
    "two_unset_variables_in_one_value": (
        service(image="${REPO}/${NAME}:${REPO}"),
        ["config.yaml: services.a.image: Environment variable 'REPO' is not set (use ${REPO:-default} for a default).",
         "config.yaml: services.a.image: Environment variable 'NAME' is not set (use ${NAME:-default} for a default)."]),
    "invalid_reference": (
        service(image="${not valid}"),
        ["config.yaml: services.a.image: Invalid variable reference; use ${NAME} or ${NAME:-default} "
         "(write $${ for a literal ${)."]),
    "several_errors_reported_together_sorted_by_key_path": (
        "server:\n  port: 0\n  colour: blue\nservices:\n"
        "  b:\n    type: vllm\n    image: i\n    port: 8081\n    volumes: [x, /a:/b, y, z, w, v, u, t, s, r, q]\n"
        "  a:\n" + MINIMAL_SERVICE + "    port: 8081\n    resources: {gpus: none}\n"
        "  Bad:\n    port: 99999\n",
        ["config.yaml: server.colour: Unknown field.",
         f"config.yaml: server.port: {PORT_RANGE}",
         f"config.yaml: services.Bad: {SERVICE_ID}",
         "config.yaml: services.Bad.image: Missing data for required field.",
         f"config.yaml: services.Bad.port: {PORT_RANGE}",
         "config.yaml: services.Bad.type: Missing data for required field.",
         "config.yaml: services.a.port: Port 8081 is already used by service 'b'.",
         f"config.yaml: services.a.resources.gpus: {GPUS}",
         "config.yaml: services.b.type: Must be one of: llama-cpp-server.",
         *[f"config.yaml: services.b.volumes.{i}: {VOLUME}" for i in [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]]]),
}


@pytest.mark.parametrize("text, expected", FAILURES.values(), ids=FAILURES.keys())
def test_invalid_config_reports_exact_lines(text, expected):
    with pytest.raises(ConfigError) as info:
        load_config_text(text, environ={})
    assert info.value.errors == expected
    assert str(info.value) == "\n".join(expected)


def test_source_label_is_used_in_messages():
    with pytest.raises(ConfigError) as info:
        load_config_text("servcies: {}\n", source="/etc/proxy/prod.yaml", environ={})
    assert info.value.errors == ["/etc/proxy/prod.yaml: servcies: Unknown field."]


# ---------------------------------------------------------------- secrets

SECRET = "s3cr3t-VALUE_9"
SECRET_EVERYWHERE = """\
server:
  host: "${S} x"
  port: ${S}
  log_level: ${S}
services:
  a:
    type: ${S}
    image: "${S} x"
    port: ${S}
    container_port: ${S}
    args: [["${S}"]]
    volumes: ["${S}", "/a:${S}", "/a:/b:${S}"]
    environment: {A: ["${S}"]}
    resources: {gpus: "${S}", memory: "${S}", cpus: "${S}", shm_size: "${S}"}
    health_path: ${S}
    timeouts: {connect: "${S}", read: "${S}"}
    stop_timeout: ${S}
    aliases: ["${S} x", ["${S}"]]
    model_name: "${S} x"
    autostart: "${S}"
    start_timeout: "${S}"
    idle_timeout: "${S}"
    drain_timeout: "${S}"
    group: "${S}"
    max_concurrent: "${S}"
    max_queue: "${S}"
  b:
    type: llama-cpp-server
    image: i
    port: ${P}
  c:
    type: llama-cpp-server
    image: i
    port: ${P}
    resources: {gpus: ["${S}"]}
"""


def test_secret_values_are_never_echoed_in_messages():
    with pytest.raises(ConfigError) as info:
        load_config_text(SECRET_EVERYWHERE, environ={"S": SECRET, "P": "8081", "PROXY_LOG_LEVEL": SECRET})
    message = str(info.value)
    assert len(info.value.errors) >= 30  # every field above failed...
    assert SECRET not in message and "s3cr3t" not in message  # ...without showing the value


# ---------------------------------------------------------------- access: tokens, keys, body size

TOKEN = "Must be a non-empty token of printable ASCII characters without spaces."


def test_admin_token_and_api_keys_come_from_variables_and_stay_out_of_repr():
    config = load("server:\n  admin_token: ${ADMIN}\n  api_keys: ['${K1}', k2-literal, 12345]\n",
                  ADMIN="adm-secret-1", K1="key-secret-2")
    assert config.server.admin_token == "adm-secret-1"
    assert config.server.api_keys == ("key-secret-2", "k2-literal", "12345")
    assert "secret" not in repr(config) and "k2-literal" not in repr(config.server)


@pytest.mark.parametrize("text", ["", "server: {admin_token: null, api_keys: null}\n", "server: {api_keys: []}\n"])
def test_no_token_and_no_keys_by_default(text):
    server = load(text).server
    assert server.admin_token is None and server.api_keys == ()


@pytest.mark.parametrize("written, expected", [
    ("10m", 10 * 1024 ** 2), ("64k", 65536), ("64K", 65536), ("64kb", 65536), ("1g", 1024 ** 3),
    ("16GB", 16 * 1024 ** 3), ("1.5k", 1536), ("100b", 100), ("100", 100), ("0", 0), (12345, 12345),
])
def test_max_body_size_is_loaded_as_bytes(written, expected):
    assert load(service(f"    max_body_size: {written}\n")).services["a"].max_body_size == expected


def test_max_body_size_defaults_to_no_limit():
    assert load(service()).services["a"].max_body_size is None
    assert load(service("    max_body_size:\n")).services["a"].max_body_size is None


@pytest.mark.parametrize("size", ["16g", "16G", "16gb", "512m", "1024k", "1.5g", "1.7m", "0.5k", "1073741824",
                                  "100b", "3B", "0", "999999999999"])
def test_parse_size_counts_as_docker_does(size):
    from docker.utils import parse_bytes  # only here: the config module must not import docker

    assert parse_size(size) == parse_bytes(size)


ACCESS_FAILURES = {
    "admin_token_empty": ("server: {admin_token: ''}\n", [f"config.yaml: server.admin_token: {TOKEN}"]),
    "admin_token_with_space": ("server: {admin_token: 'a b'}\n", [f"config.yaml: server.admin_token: {TOKEN}"]),
    "admin_token_not_ascii": ("server: {admin_token: 'tökén'}\n", [f"config.yaml: server.admin_token: {TOKEN}"]),
    "admin_token_list": ("server: {admin_token: [a]}\n", ["config.yaml: server.admin_token: Not a valid string."]),
    "admin_token_unset_variable": (
        "server: {admin_token: '${PROXY_ADMIN_TOKEN}'}\n",
        ["config.yaml: server.admin_token: Environment variable 'PROXY_ADMIN_TOKEN' is not set "
         "(use ${PROXY_ADMIN_TOKEN:-default} for a default)."]),
    "admin_token_empty_default": (
        "server: {admin_token: '${PROXY_ADMIN_TOKEN:-}'}\n", [f"config.yaml: server.admin_token: {TOKEN}"]),
    "api_keys_not_a_list": ("server: {api_keys: key}\n", ["config.yaml: server.api_keys: Not a valid list."]),
    "api_keys_empty_and_spaced": (
        "server: {api_keys: [ok, '', 'a b', null]}\n",
        [f"config.yaml: server.api_keys.1: {TOKEN}", f"config.yaml: server.api_keys.2: {TOKEN}",
         "config.yaml: server.api_keys.3: Field may not be null."]),
    "max_body_size_words": (service("    max_body_size: 10 MB\n"), [f"config.yaml: services.a.max_body_size: {SIZE}"]),
    "max_body_size_unit": (service("    max_body_size: 10t\n"), [f"config.yaml: services.a.max_body_size: {SIZE}"]),
    "max_body_size_negative": (service("    max_body_size: -1\n"), [f"config.yaml: services.a.max_body_size: {SIZE}"]),
    "max_body_size_bool": (service("    max_body_size: true\n"), [f"config.yaml: services.a.max_body_size: {SIZE}"]),
    "max_body_size_beyond_a_float": (
        service(f"    max_body_size: '{'9' * 400}'\n"), [f"config.yaml: services.a.max_body_size: {SIZE}"]),
}


@pytest.mark.parametrize("text, expected", ACCESS_FAILURES.values(), ids=ACCESS_FAILURES.keys())
def test_invalid_access_keys_report_exact_lines(text, expected):
    assert errors_of(text) == expected


def test_tokens_are_never_echoed_in_messages():
    text = ("server:\n  admin_token: '${S} x'\n  api_keys: ['${S} y', ['${S}']]\n"
            + service("    max_body_size: '${S}'\n"))
    errors = errors_of(text, S=SECRET)
    assert len(errors) == 4
    assert not any("s3cr3t" in line for line in errors)


# ---------------------------------------------------------------- front door and lifecycle

MODEL_NAME = ("Must be a model name of 1-200 letters, digits, '.', '_', ':', '/' or '-', "
              "starting with a letter or digit.")
DURATION = "Must be a duration like '10m', '90s', '1h' or a number of seconds."
GROUP_NAME = ("Group name must be 1-63 characters of lowercase letters, digits, '-', '_' or '.', "
              "starting with a letter or digit.")


def services(*bodies: str, groups: str = "") -> str:
    """A document with services s0, s1, ... (ports 8081, ...); each body holds extra keys."""
    text = f"groups:\n{groups}" if groups else ""
    text += "services:\n"
    for index, body in enumerate(bodies):
        text += f"  s{index}:\n{MINIMAL_SERVICE}    port: {8081 + index}\n{body}"
    return text


def test_lifecycle_defaults():
    config = load(service())
    a = config.services["a"]
    assert (a.aliases, a.model_name, a.autostart, a.start_timeout, a.idle_timeout, a.group,
            a.max_concurrent, a.max_queue, a.drain_timeout) == ((), None, False, 300.0, None, None, None, None, 60.0)
    assert dict(config.groups) == {}


def test_null_lifecycle_keys_mean_defaults():
    config = load(service("    aliases:\n    model_name:\n    autostart:\n    start_timeout:\n    idle_timeout:\n"
                          "    group:\n    max_concurrent:\n    max_queue:\n    drain_timeout:\n") + "groups:\n")
    assert config.services["a"] == load(service()).services["a"]
    assert dict(config.groups) == {}


def test_lifecycle_keys_load():
    config = load(service(
        "    aliases: ['llama3:8b', meta-llama/Llama-3-8B, Q.w_e-n/2.5:7B]\n"
        "    model_name: meta-llama/Meta-Llama-3-8B-Instruct\n    autostart: true\n"
        "    start_timeout: 2m\n    idle_timeout: 1h30m\n    group: gpu0\n"
        "    max_concurrent: 4\n    max_queue: 0\n    drain_timeout: 0\n") + "groups: {gpu0: {exclusive: true}}\n")
    a = config.services["a"]
    assert a.aliases == ("llama3:8b", "meta-llama/Llama-3-8B", "Q.w_e-n/2.5:7B")
    assert a.model_name == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert (a.autostart, a.start_timeout, a.idle_timeout, a.group) == (True, 120.0, 5400.0, "gpu0")
    assert (a.max_concurrent, a.max_queue, a.drain_timeout) == (4, 0, 0.0)
    assert dict(config.groups) == {"gpu0": GroupConfig(name="gpu0", exclusive=True)}


def test_lifecycle_keys_come_from_variables():
    config = load(service("    autostart: ${AUTO}\n    idle_timeout: ${IDLE}\n    start_timeout: ${START}\n"
                          "    max_concurrent: ${MC}\n    max_queue: ${MQ}\n    aliases: ['${ALIAS}']\n"),
                  AUTO="true", IDLE="10m", START="2.5", MC="3", MQ="7", ALIAS="llama3:8b")
    a = config.services["a"]
    assert (a.autostart, a.idle_timeout, a.start_timeout, a.max_concurrent, a.max_queue, a.aliases) == (
        True, 600.0, 2.5, 3, 7, ("llama3:8b",))


@pytest.mark.parametrize("max_concurrent, max_queue, expected", [
    ("", "", (None, None)),
    ("    max_concurrent: 1\n", "", (1, 100)),  # the queue defaults to 100 with a limit
    ("    max_concurrent: 2\n", "    max_queue:\n", (2, 100)),
    ("    max_concurrent: 2\n", "    max_queue: 0\n", (2, 0)),  # no waiting: refuse at once
    ("    max_concurrent: 2\n", "    max_queue: 5000\n", (2, 5000)),
])
def test_max_queue_is_stored_as_its_effective_value(max_concurrent, max_queue, expected):
    a = load(service(max_concurrent + max_queue)).services["a"]
    assert (a.max_concurrent, a.max_queue) == expected


def test_service_config_fills_in_max_queue_when_constructed_directly():
    assert dataclasses.replace(LLAMA3, max_concurrent=3).max_queue == 100
    assert LLAMA3.max_queue is None


@pytest.mark.parametrize("yaml_value, expected", [
    ("true", True), ("false", False), ("yes", True), ("'on'", True), ("'0'", False), ("1", True),
])
def test_autostart_forms(yaml_value, expected):
    assert load(service(f"    autostart: {yaml_value}\n")).services["a"].autostart is expected


@pytest.mark.parametrize("written, seconds", [
    ("90", 90.0), ("1.5", 1.5), ("0.25", 0.25), ("'90'", 90.0), ("'2.5'", 2.5), ("90s", 90.0), ("10m", 600.0),
    ("1h", 3600.0), ("1h30m", 5400.0), ("500ms", 0.5), ("1.5h", 5400.0), ("2m30s", 150.0),
    ("1h1m1s1ms", 3661.001), ("0.5s", 0.5), ("1s500ms", 1.5), ("100000h", 360000000.0),
])
def test_durations(written, seconds):
    a = load(service(f"    start_timeout: {written}\n    idle_timeout: {written}\n"
                     f"    drain_timeout: {written}\n")).services["a"]
    assert a.start_timeout == a.idle_timeout == a.drain_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("value, seconds", [
    (90, 90.0), (1.5, 1.5), ("90", 90.0), ("-1", -1.0), (-2, -2.0), ("0", 0.0), ("0s", 0.0), ("1h30m", 5400.0),
    ("500ms", 0.5), ("1m1m", 120.0),
    (True, None), (None, None), ("", None), ("10", 10.0), ("10 m", None), (" 10m", None), ("10m ", None),
    ("10min", None), ("10M", None), ("1d", None), ("m", None), ("1.h", None), (".5h", None), ("-1s", None),
    ("1e3", None), ("inf", None), ("nan", None), (float("inf"), None), (float("nan"), None),
    (10 ** 400, None), ("9" * 400 + "h", None), ("9" * 400, None), ([1], None), ({"s": 1}, None),
    ("10m\n", None), ("１０m", None),  # full-width digits are not \d here
])
def test_parse_duration(value, seconds):
    result = parse_duration(value)
    assert result == (None if seconds is None else pytest.approx(seconds))


def test_config_groups_are_read_only_and_keep_file_order():
    config = load("groups: {z: {exclusive: true}, a: {}, m: }\n")
    assert list(config.groups) == ["z", "a", "m"]
    assert config.groups["m"] == GroupConfig(name="m", exclusive=False)  # null: all defaults
    with pytest.raises(TypeError):
        config.groups["new"] = GroupConfig("new")  # type: ignore[index]


def test_service_for_model_by_id_and_alias():
    config = load(services("    aliases: ['llama3:8b', meta-llama/Llama-3-8B]\n", "",
                           "    aliases: [qwen]\n"))
    s0, s1, s2 = config.services.values()
    assert config.service_for_model("s0") is s0
    assert config.service_for_model("llama3:8b") is s0
    assert config.service_for_model("meta-llama/Llama-3-8B") is s0
    assert config.service_for_model("s1") is s1
    assert config.service_for_model("qwen") is s2


@pytest.mark.parametrize("model", ["nope", "", "S0", "LLAMA3:8B", "llama3", " s0", "s0 ", None, 5, ["s0"], {"a": 1}])
def test_service_for_model_unknown_is_none(model):
    config = load(services("    aliases: ['llama3:8b']\n"))
    assert config.service_for_model(model) is None  # exact names only; never raises


def test_models_lists_ids_then_aliases_in_file_order():
    config = load("services:\n"
                  f"  zeta:\n{MINIMAL_SERVICE}    port: 9001\n    aliases: [z2, z1]\n"
                  f"  alpha:\n{MINIMAL_SERVICE}    port: 9002\n"
                  f"  mid:\n{MINIMAL_SERVICE}    port: 9003\n    aliases: [m:1]\n")
    zeta, alpha, mid = config.services.values()
    assert config.models() == [("zeta", zeta), ("z2", zeta), ("z1", zeta), ("alpha", alpha), ("mid", mid),
                               ("m:1", mid)]
    assert load("").models() == []


def test_direct_construction_keeps_working_and_builds_the_lookup():
    config = Config(server=ServerConfig(), services={"llama3": LLAMA3}, source="x")
    assert dict(config.groups) == {}
    assert config.models() == [("llama3", LLAMA3)]
    assert config.service_for_model("llama3") is LLAMA3
    aliased = dataclasses.replace(LLAMA3, aliases=("l3",))
    replaced = dataclasses.replace(config, services={"llama3": aliased})  # the lookup is rebuilt
    assert replaced.service_for_model("l3") is aliased
    assert "_by_model" not in repr(config) and config == load_config_text(FULL_EXAMPLE, source="x",
                                                                          environ={"HF_TOKEN": "hf_abc"})


def test_to_dict_includes_the_lifecycle_keys_as_plain_json():
    config = load(services("    aliases: [x, 'y:1']\n    autostart: true\n    idle_timeout: 10m\n    group: g\n"
                           "    max_concurrent: 2\n", groups="  g: {exclusive: true}\n"))
    data = config.services["s0"].to_dict()
    assert json.loads(json.dumps(data)) == data
    assert {key: data[key] for key in ("aliases", "model_name", "autostart", "start_timeout", "idle_timeout",
                                       "group", "max_concurrent", "max_queue", "drain_timeout")} == {
        "aliases": ["x", "y:1"], "model_name": None, "autostart": True, "start_timeout": 300.0,
        "idle_timeout": 600.0, "group": "g", "max_concurrent": 2, "max_queue": 100, "drain_timeout": 60.0}


LIFECYCLE_FAILURES = {
    "aliases_not_a_list": (service("    aliases: llama3\n"), ["config.yaml: services.a.aliases: Not a valid list."]),
    "bad_aliases": (
        service(f"    aliases: [ok, '', 'a b', 5, null, [x], -x, /x, \"x\\ty\", \"nl\\n\", {'x' * 201}, é, 'a@b', ok2]\n"),
        [f"config.yaml: services.a.aliases.1: {MODEL_NAME}",
         f"config.yaml: services.a.aliases.2: {MODEL_NAME}",
         "config.yaml: services.a.aliases.3: Not a valid string.",
         "config.yaml: services.a.aliases.4: Field may not be null.",
         "config.yaml: services.a.aliases.5: Not a valid string.",
         *[f"config.yaml: services.a.aliases.{i}: {MODEL_NAME}" for i in range(6, 13)]]),
    "alias_of_200_characters_is_fine_201_is_not": (
        service(f"    aliases: [{'x' * 200}, {'y' * 201}]\n"), [f"config.yaml: services.a.aliases.1: {MODEL_NAME}"]),
    "alias_used_twice_in_one_service": (
        service("    aliases: [x, y, x]\n"), ["config.yaml: services.a.aliases.2: Alias 'x' is already used by service 'a'."]),
    "alias_used_by_an_earlier_service": (
        services("    aliases: ['llama3:8b']\n", "    aliases: [other, 'llama3:8b']\n",
                 "    aliases: ['llama3:8b']\n"),
        ["config.yaml: services.s1.aliases.1: Alias 'llama3:8b' is already used by service 's0'.",
         "config.yaml: services.s2.aliases.0: Alias 'llama3:8b' is already used by service 's0'."]),
    "alias_is_a_service_id": (
        services("    aliases: [s1]\n", "    aliases: [s0, s1]\n"),
        ["config.yaml: services.s0.aliases.0: Alias 's1' is the id of service 's1'.",
         "config.yaml: services.s1.aliases.0: Alias 's0' is the id of service 's0'.",
         "config.yaml: services.s1.aliases.1: Alias 's1' is the id of service 's1'."]),
    "alias_checks_keep_positions_after_a_bad_item": (
        services("    aliases: [x]\n", "    aliases: ['', 5, x]\n"),
        [f"config.yaml: services.s1.aliases.0: {MODEL_NAME}",
         "config.yaml: services.s1.aliases.1: Not a valid string.",
         "config.yaml: services.s1.aliases.2: Alias 'x' is already used by service 's0'."]),
    "alias_checks_run_with_other_field_errors": (
        services("    aliases: [x]\n    stop_timeout: -1\n", "    aliases: [x]\n    imgae: i\n"),
        ["config.yaml: services.s0.stop_timeout: Must be greater than or equal to 0.",
         "config.yaml: services.s1.aliases.0: Alias 'x' is already used by service 's0'.",
         "config.yaml: services.s1.imgae: Unknown field."]),
    "model_name_bad": (
        service("    model_name: 'a b'\n"), [f"config.yaml: services.a.model_name: {MODEL_NAME}"]),
    "model_name_empty": (service("    model_name: ''\n"), [f"config.yaml: services.a.model_name: {MODEL_NAME}"]),
    "model_name_number": (service("    model_name: 8\n"), ["config.yaml: services.a.model_name: Not a valid string."]),
    "autostart_word": (service("    autostart: sometimes\n"), ["config.yaml: services.a.autostart: Not a valid boolean."]),
    "autostart_list": (service("    autostart: [true]\n"), ["config.yaml: services.a.autostart: Not a valid boolean."]),
    "durations_bad_form": (
        service("    start_timeout: 10 m\n    idle_timeout: 1d\n    drain_timeout: [1]\n"),
        [f"config.yaml: services.a.drain_timeout: {DURATION}",
         f"config.yaml: services.a.idle_timeout: {DURATION}",
         f"config.yaml: services.a.start_timeout: {DURATION}"]),
    "durations_bool": (service("    idle_timeout: true\n"), [f"config.yaml: services.a.idle_timeout: {DURATION}"]),
    "durations_infinite": (
        service("    start_timeout: .inf\n    idle_timeout: .nan\n    drain_timeout: " + "9" * 400 + "\n"),
        [f"config.yaml: services.a.drain_timeout: {DURATION}",
         f"config.yaml: services.a.idle_timeout: {DURATION}",
         f"config.yaml: services.a.start_timeout: {DURATION}"]),
    "durations_zero": (
        service("    start_timeout: 0\n    idle_timeout: 0s\n    drain_timeout: 0ms\n"),
        ["config.yaml: services.a.idle_timeout: Must be greater than 0.",
         "config.yaml: services.a.start_timeout: Must be greater than 0."]),  # drain_timeout 0: don't wait
    "durations_negative": (
        service("    start_timeout: -1\n    idle_timeout: '-5'\n    drain_timeout: -0.5\n"),
        ["config.yaml: services.a.drain_timeout: Must be greater than or equal to 0.",
         "config.yaml: services.a.idle_timeout: Must be greater than 0.",
         "config.yaml: services.a.start_timeout: Must be greater than 0."]),
    "negative_duration_with_unit": (
        service("    idle_timeout: -5m\n"), [f"config.yaml: services.a.idle_timeout: {DURATION}"]),
    "max_concurrent_zero": (
        service("    max_concurrent: 0\n"), ["config.yaml: services.a.max_concurrent: Must be greater than or equal to 1."]),
    "max_concurrent_float": (
        service("    max_concurrent: 1.5\n"), ["config.yaml: services.a.max_concurrent: Not a valid integer."]),
    "max_queue_negative": (
        service("    max_concurrent: 1\n    max_queue: -1\n"),
        ["config.yaml: services.a.max_queue: Must be greater than or equal to 0."]),
    "max_queue_without_max_concurrent": (
        service("    max_queue: 10\n"), ["config.yaml: services.a.max_queue: Needs max_concurrent."]),
    "max_queue_with_null_max_concurrent": (
        service("    max_queue: 10\n    max_concurrent:\n"), ["config.yaml: services.a.max_queue: Needs max_concurrent."]),
    "max_queue_with_a_bad_max_concurrent_is_not_also_an_error": (
        service("    max_queue: 10\n    max_concurrent: lots\n"),
        ["config.yaml: services.a.max_concurrent: Not a valid integer."]),
    "max_queue_bad_and_no_max_concurrent": (
        service("    max_queue: x\n"), ["config.yaml: services.a.max_queue: Not a valid integer."]),
    "unknown_group": (
        service("    group: g\n"), ["config.yaml: services.a.group: Unknown group 'g'; define it under groups."]),
    "unknown_group_with_other_groups": (
        services("    group: gpu0\n", "    group: gpu1\n", groups="  gpu0: {exclusive: true}\n"),
        ["config.yaml: services.s1.group: Unknown group 'gpu1'; define it under groups."]),
    "group_bad_form": (
        service("    group: GPU 0\n"), [f"config.yaml: services.a.group: {GROUP_NAME}"]),
    "group_not_a_string": (service("    group: [g]\n"), ["config.yaml: services.a.group: Not a valid string."]),
    "groups_not_a_mapping": (  # not also "Unknown group" for every service
        services("    group: g\n", groups="  - g\n"), ["config.yaml: groups: Not a valid mapping type."]),
    "groups_bad_name_and_settings": (
        services("    group: gpu0\n", groups="  GPU 0: {}\n  gpu0: {exclusive: maybe, shared: true}\n  g2: [x]\n"),
        [f"config.yaml: groups.GPU 0: {GROUP_NAME}",
         "config.yaml: groups.g2: Not a valid mapping type.",
         "config.yaml: groups.gpu0.exclusive: Not a valid boolean.",
         "config.yaml: groups.gpu0.shared: Unknown field."]),
    "group_unset_variable": (
        service("    group: ${GROUP}\n"),
        ["config.yaml: services.a.group: Environment variable 'GROUP' is not set (use ${GROUP:-default} for a default)."]),
}


@pytest.mark.parametrize("text, expected", LIFECYCLE_FAILURES.values(), ids=LIFECYCLE_FAILURES.keys())
def test_invalid_lifecycle_keys_report_exact_lines(text, expected):
    assert errors_of(text) == expected


# ---------------------------------------------------------------- image pulls


def test_pull_policy_and_registry_auth_default_to_missing_and_none():
    a = load(service()).services["a"]
    assert (a.pull_policy, a.registry_auth) == ("missing", None)


def test_registry_auth_loads_its_password_is_a_secret_and_stays_out_of_repr():
    config = load(service("    pull_policy: always\n    registry_auth: {username: '${USER}', password: '${PASSWORD}'}\n"
                          "  b: {type: llama-cpp-server, image: img, port: 8082, pull_policy: never,\n"
                          "      registry_auth: {username: bot, password: 'pw literal 1'}}\n"),
                  USER="robot", PASSWORD="registry-secret-3")
    a, b = config.services["a"], config.services["b"]
    assert (a.pull_policy, a.registry_auth.username, a.registry_auth.password) == ("always", "robot",
                                                                                  "registry-secret-3")
    assert (b.pull_policy, b.registry_auth.password) == ("never", "pw literal 1")
    assert {"registry-secret-3", "pw literal 1"} <= config.secrets  # a literal password too
    assert "registry-secret-3" not in repr(config) and "pw literal" not in repr(config)


PULL_FAILURES = {
    "pull_policy_unknown": (service("    pull_policy: sometimes\n"),
                            ["config.yaml: services.a.pull_policy: Must be one of: missing, always, never."]),
    "pull_policy_not_a_string": (service("    pull_policy: [always]\n"),
                                 ["config.yaml: services.a.pull_policy: Not a valid string."]),
    "registry_auth_without_password": (
        service("    registry_auth: {username: u}\n"),
        ["config.yaml: services.a.registry_auth.password: Missing data for required field."]),
    "registry_auth_empty_and_unknown": (
        service("    registry_auth: {username: '', password: p, token: t}\n"),
        ["config.yaml: services.a.registry_auth.token: Unknown field.",
         "config.yaml: services.a.registry_auth.username: Shorter than minimum length 1."]),
    "registry_auth_not_a_mapping": (service("    registry_auth: user:pass\n"),
                                    ["config.yaml: services.a.registry_auth: Not a valid mapping type."]),
}


@pytest.mark.parametrize("text, expected", PULL_FAILURES.values(), ids=PULL_FAILURES.keys())
def test_invalid_pull_keys_report_exact_lines(text, expected):
    assert errors_of(text) == expected


README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def _readme_config_examples() -> list[str]:
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)


def test_readme_configuration_examples_load():
    examples = _readme_config_examples()
    assert len(examples) == 2
    environ = {"PROXY_ADMIN_TOKEN": "t", "CLIENT_KEY": "k", "HF_TOKEN": "h", "REGISTRY_USER": "u",
               "REGISTRY_PASSWORD": "p"}
    reference = load_config_text(examples[0], environ=environ)
    assert reference.services["llama3"].group == "gpu0" and reference.groups["gpu0"].exclusive
    assert reference.services["llama3"].pull_policy == "missing" and reference.services["llama3"].registry_auth
    config = load_config_text(examples[1], environ=environ)
    assert config.groups["gpu0"].exclusive
    llama3, qwen = config.services.values()
    assert (llama3.autostart, llama3.idle_timeout, llama3.max_concurrent, llama3.max_queue) == (True, 900.0, 4, 32)
    assert (qwen.autostart, qwen.idle_timeout, qwen.max_concurrent, qwen.max_queue) == (True, 900.0, 2, 100)
    assert config.service_for_model("Qwen/Qwen2.5-7B-Instruct") is qwen
    assert config.service_for_model("llama3:8b") is llama3


# ---------------------------------------------------------------- files and paths


def test_load_config_reads_a_file_and_names_it_in_messages(tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text(FULL_EXAMPLE, encoding="utf-8")
    config = load_config(path, environ={"HF_TOKEN": "hf_abc"})
    assert config.services["llama3"] == LLAMA3
    assert config.source == str(path)
    path.write_text("\ufeffservcies: {}\n", encoding="utf-8")  # a BOM is tolerated
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert info.value.errors == [f"{path}: servcies: Unknown field."]


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.errors == [f"{path}: cannot read config: No such file or directory"]


def test_config_path_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    assert info.value.errors == [f"{tmp_path}: cannot read config: Is a directory"]


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"server:\n  host: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.errors == [f"{path}: cannot read config: not UTF-8 text (invalid continuation byte at byte 19)"]


@pytest.mark.parametrize("cli, environ, expected", [
    ("cli.yaml", {"PROXY_CONFIG": "env.yaml"}, "cli.yaml"),
    (None, {"PROXY_CONFIG": "env.yaml"}, "env.yaml"),
    (None, {}, "config.yaml"),
    (None, {"PROXY_CONFIG": ""}, "config.yaml"),
])
def test_config_path_precedence(cli, environ, expected):
    assert config_path(cli, environ=environ) == expected


def test_config_module_is_pure():
    code = ("import sys, proxy.config; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('docker', 'flask', 'loguru', 'gevent')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# ---------------------------------------------------------------- never a traceback


def assert_config_or_config_error(text: str, environ=None) -> None:
    try:
        result = load_config_text(text, environ=environ or {"X": "1"})
    except ConfigError as exc:
        assert exc.errors, "a ConfigError always says why"
        for line in exc.errors:
            assert "\n" not in line and (line.startswith("config.yaml: ") or line.startswith("PROXY_LOG_LEVEL: "))
    else:
        assert isinstance(result, Config)


@pytest.mark.parametrize("text", [
    "a: &a [*a]\nservices: &s {x: *s}\n",  # self-referencing aliases
    "services:\n  a: &a\n    type: llama-cpp-server\n    image: i\n    port: 1\n    args: *a\n",
    "[" * 5000 + "]" * 5000,  # nested too deeply for the parser
    "x: " + "9" * 5000,  # an int too long for Python to convert
    "services: {a: {port: " + "9" * 4000 + "}}",
    "services: {a: {port: '" + "9" * 5000 + "'}}",
    "services: {a: {timeouts: {read: " + "9" * 4000 + "}}}",
    "? [a, b]\n: c\n",  # unhashable key
    "? {a: 1}\n: c\n",
    "services: {? [1]: x}\n",
    "server: !!binary aGVsbG8=\n",
    "server: !!set {a, b}\n",
    "server: !!omap [a: 1]\n",
    "server: !!timestamp 2024-13-45\n",
    "server: !!float abc\n",
    "services: {null: {}, 1: {}, true: {}, 1.5: {}}\n",
    "server: {null: 1, 2: 3}\n",
    "services: {a: {environment: {null: null}}}\n",
    "services: {a: {'x\ny': 1, '\\x85': 2}}\n",
    "\t", "%", "%YAML 1.1\n---\na: 1\n", "...", "---", "&a", "!", "@", "`", "a: |\n b\n c",
    "\x00", "\ud800", "a: \"\\ud800\"",
])
def test_hand_written_garbage_never_raises_anything_else(text):
    started = time.monotonic()
    assert_config_or_config_error(text)
    assert time.monotonic() - started < 5


def test_billion_laughs_is_cheap():
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        text += f"{level}: &{level} [{','.join(['*' + previous] * 9)}]\n"
    text += "services: {x: {type: llama-cpp-server, image: i, port: 1, args: *i, environment: {A: *i}}}\n"
    started = time.monotonic()
    assert_config_or_config_error(text)
    assert time.monotonic() - started < 5


def test_null_for_every_key_of_the_full_example():
    """Replacing each value of the example with null, one at a time."""
    document = yaml.safe_load(FULL_EXAMPLE)
    for path in _paths(document):
        broken = yaml.safe_load(FULL_EXAMPLE)
        _set(broken, path, None)
        assert_config_or_config_error(yaml.safe_dump(broken), environ={"HF_TOKEN": "t"})


def test_every_line_dropped_or_truncated_from_the_full_example():
    lines = FULL_EXAMPLE.splitlines(keepends=True)
    for index, line in enumerate(lines):
        assert_config_or_config_error("".join(lines[:index] + lines[index + 1:]))
        for cut in range(0, len(line), 3):
            assert_config_or_config_error("".join(lines[:index]) + line[:cut] + "".join(lines[index + 1:]))


def _paths(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield path + (key,)
            yield from _paths(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield path + (index,)
            yield from _paths(value, path + (index,))


def _set(node, path, value):
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


KNOWN_KEYS = ["server", "services", "host", "port", "log_level", "type", "image", "container_port", "args",
              "volumes", "environment", "resources", "gpus", "memory", "cpus", "shm_size", "health_path",
              "timeouts", "connect", "read", "stop_timeout", "llama3", "a", "Bad Id", "HF_TOKEN",
              "aliases", "model_name", "autostart", "start_timeout", "idle_timeout", "group", "groups",
              "exclusive", "max_concurrent", "max_queue", "drain_timeout", "gpu0", "metrics_path"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30, max_value=10**300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["all", "llama-cpp-server", "/a:/b", "/a:/b:ro", "16g", "/health", "INFO", "${X}",
                     "${UNSET}", "${X:-d}", "$${X}", "${", "8081", "11000", "0", "-1", "10m", "1h30m", "500ms",
                     "gpu0", "llama3", "a", "llama3:8b"]),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8), st.integers()),
                        children, max_size=5),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_fuzz_any_document_gives_config_or_config_error(document):
    assert_config_or_config_error(yaml.safe_dump(document, allow_unicode=True))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_example_gives_config_or_config_error(data):
    text = FULL_EXAMPLE
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(text)))
        insert = data.draw(st.sampled_from(["", ":", "- ", "{", "[", "]", "}", "'", '"', "\n", "  ", "&x", "*x",
                                            "!!", "null", "${", "0", "#", "\t", ",", "?"]))
        delete = data.draw(st.integers(0, 5))
        text = text[:position] + insert + text[position + delete:]
    assert_config_or_config_error(text)
