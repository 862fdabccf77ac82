"""The Docker engine: the only package that imports docker-py."""
from .containers import Containers, LogStream
from .pulls import Progress
from .spec import ContainerInfo, config_hash, docker_epoch

__all__ = ["ContainerInfo", "Containers", "LogStream", "Progress", "config_hash", "docker_epoch"]
