"""The Docker engines services run on: one ``Containers`` and one ``ContainerStates`` (events
stream and heartbeat) per engine, made on first use. Each engine is on its own: one that is
down or hung makes only its own services ``docker_unavailable``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

from ..config import LOCAL_ENGINE, EngineConfig, ServiceConfig
from .container_states import ContainerStates
from .engine import Containers


@dataclass(frozen=True)
class Engine:
    config: EngineConfig
    containers: Containers
    states: ContainerStates

    @property
    def name(self) -> str:
        return self.config.name


class Engines:
    """The registry: ``for_service(service)`` is a dict lookup once the engine is made."""

    def __init__(self, prefix: str, configs: Mapping[str, EngineConfig], local_client=None):
        self._prefix = prefix
        self._configs = dict(configs)
        self._local_client = local_client  # a docker client given from outside (tests), for "local"
        self._made: dict[str, Engine] = {}
        self._fixed: Engine | None = None
        self._started = False

    @classmethod
    def of(cls, containers: Containers, states: ContainerStates) -> "Engines":
        """One engine for every service, whatever it names (the single-engine tests)."""
        engines = cls(containers.prefix, {})
        engines._fixed = Engine(EngineConfig(LOCAL_ENGINE), containers, states)
        return engines

    def for_service(self, service: ServiceConfig) -> Engine:
        return self.get(service.engine)

    def get(self, name: str) -> Engine:
        if self._fixed is not None:
            return self._fixed
        found = self._made.get(name)
        return found if found is not None else self._make(name)

    def _make(self, name: str) -> Engine:
        config = self._configs[name]  # the config check makes every named engine exist
        client = self._local_client if name == LOCAL_ENGINE and config.docker_host is None else None
        containers = Containers(self._prefix, client=client, engine=config)
        engine = Engine(config, containers, ContainerStates(containers))
        self._made[name] = engine
        if self._started:
            engine.states.start()
        return engine

    def configured(self) -> Iterator[Engine]:
        """Every engine of the config, in its order (made now if need be)."""
        if self._fixed is not None:
            yield self._fixed
            return
        for name in list(self._configs):
            yield self.get(name)

    def reconfigure(self, configs: Mapping[str, EngineConfig]) -> None:
        """Engines whose settings changed are made anew on next use. One that left the config
        stays known, so a reload can still stop its services there."""
        for name, config in configs.items():
            old = self._configs.get(name)
            if old is not None and old != config and name in self._made:
                self._made.pop(name).states.stop()
        self._configs.update(configs)
        if self._started:
            for name in configs:
                self.get(name)

    def start(self) -> None:
        self._started = True
        for engine in self.configured():
            engine.states.start()

    def stop(self) -> None:
        engines = [self._fixed] if self._fixed is not None else list(self._made.values())
        for engine in engines:
            engine.states.stop()
