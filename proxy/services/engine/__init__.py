"""The Docker engine: the only package that imports docker-py."""
from .containers import Containers
from .spec import ContainerInfo, config_hash, docker_epoch

__all__ = ["ContainerInfo", "Containers", "config_hash", "docker_epoch"]
