"""The Docker engine: the only package that imports docker-py."""
from .containers import Containers, LogStream
from .spec import ContainerInfo, config_hash, docker_epoch

__all__ = ["ContainerInfo", "Containers", "LogStream", "config_hash", "docker_epoch"]
