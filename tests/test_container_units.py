"""Pure pieces of the container module: GPU device requests, hints, labels, config hashes."""
from __future__ import annotations

import time

import pytest
from docker.types import DeviceRequest

from proxy.config import load_config_text
from proxy.services.engine.containers import Containers
from proxy.services.engine.spec import age_seconds as _age_seconds, config_hash, device_requests, hint_for
from proxy.services.engine.spec import labels as spec_labels

SERVICE = """
services:
  llm:
    type: llama-cpp-server
    image: example/llama:latest
    port: 8081
{extra}
"""


def _service(extra: str = ""):
    return load_config_text(SERVICE.format(extra=extra)).services["llm"]


@pytest.mark.parametrize("gpus,expected", [
    (None, []),
    ("all", [DeviceRequest(count=-1, capabilities=[["gpu"]])]),
    (2, [DeviceRequest(count=2, capabilities=[["gpu"]])]),
    (("0", "2"), [DeviceRequest(device_ids=["0", "2"], capabilities=[["gpu"]])]),
])
def test_each_gpus_form_maps_to_its_device_request(gpus, expected):
    assert device_requests(gpus) == expected


@pytest.mark.parametrize("yaml_gpus,expected_count,expected_ids", [
    ("all", -1, []), ("1", 1, []), ('["0", "2"]', 0, ["0", "2"]), ("[1]", 0, ["1"]),
])
def test_gpus_from_the_config_file_map_end_to_end(yaml_gpus, expected_count, expected_ids):
    (request,) = device_requests(_service(f"    resources:\n      gpus: {yaml_gpus}").resources.gpus)
    assert request["Count"] == expected_count
    assert request["DeviceIDs"] == expected_ids
    assert request["Capabilities"] == [["gpu"]]


@pytest.mark.parametrize("docker_message,expected", [
    ('could not select device driver "" with capabilities: [[gpu]]', "NVIDIA"),
    ("driver failed programming external connectivity: Bind for 127.0.0.1:8081 failed: port is already allocated",
     "Host port 8081"),
    ("listen tcp4 127.0.0.1:8081: bind: address already in use", "Host port 8081"),
    ("pull access denied for example/llama, repository does not exist", "could not be pulled"),
    ("something nobody foresaw", "Docker refused"),
])
def test_docker_failures_get_a_plain_hint(docker_message, expected):
    assert expected in hint_for(docker_message, _service())


def test_labels_mark_the_container_as_ours_for_its_service():
    service = _service()
    labels = spec_labels("pfx", service)
    assert labels == {"io.inference-proxy.managed": "true", "io.inference-proxy.instance": "pfx",
                      "io.inference-proxy.service": "llm", "io.inference-proxy.config-hash": config_hash(service)}
    assert Containers("pfx").name("llm") == "pfx-llm"


def test_config_hash_changes_with_what_shapes_the_container_only():
    assert config_hash(_service()) == config_hash(_service())
    assert config_hash(_service()) != config_hash(_service("    args: [\"--ctx\", \"4096\"]"))
    assert config_hash(_service()) == config_hash(_service("    timeouts: {read: 5}\n    max_body_size: 1m"))


def test_making_the_container_module_creates_no_docker_client():
    containers = Containers("pfx", client_factory=lambda: pytest.fail("a client was made"))
    assert containers.name("x") == "pfx-x"


@pytest.mark.parametrize("fraction", [".123456789", ""])
def test_docker_creation_times_parse_to_an_age(fraction):
    ten_seconds_ago = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 10)) + fraction + "Z"
    assert 8 < _age_seconds(ten_seconds_ago) < 60


def test_an_unreadable_creation_time_counts_as_old():
    assert _age_seconds("yesterday") == float("inf")
