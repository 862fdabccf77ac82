"""What a new config changes against the running one, service by service."""
from __future__ import annotations

from dataclasses import dataclass

from .model import Config

# Server settings only a restart applies: the socket is bound once, by the gunicorn master.
# (container_prefix names the containers: changing it would leave the running ones behind.)
RESTART_ONLY = ("host", "port", "container_prefix")


@dataclass(frozen=True)
class ConfigChange:
    added: tuple[str, ...]      # new services: routable at once, started on demand
    removed: tuple[str, ...]    # gone: their containers are drained and stopped
    restarted: tuple[str, ...]  # their containers' shape changed: drained and made anew if running
    updated: tuple[str, ...]    # only what the proxy does changed: applied to new requests
    server: tuple[str, ...]     # server and group settings changed (applied at once)
    needs_restart: tuple[str, ...]  # server settings that only a restart of the proxy applies

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.restarted or self.updated or self.server
                    or self.needs_restart)

    def to_dict(self) -> dict:
        return {"added": list(self.added), "removed": list(self.removed), "restarted": list(self.restarted),
                "updated": list(self.updated), "server": list(self.server),
                "needs_restart": list(self.needs_restart)}


def diff(old: Config, new: Config) -> ConfigChange:
    added = tuple(sid for sid in new.services if sid not in old.services)
    removed = tuple(sid for sid in old.services if sid not in new.services)
    kept = [sid for sid in new.services if sid in old.services]
    restarted = tuple(sid for sid in kept if old.services[sid].shape() != new.services[sid].shape())
    updated = tuple(sid for sid in kept if sid not in restarted and old.services[sid] != new.services[sid])
    changed = [name for name in old.server.__dataclass_fields__ if not name.startswith("_")
               and getattr(old.server, name) != getattr(new.server, name)]
    if dict(old.groups) != dict(new.groups):
        changed.append("groups")
    if dict(old.engines) != dict(new.engines):
        changed.append("engines")  # each engine's client is made anew from the new settings
    return ConfigChange(added, removed, restarted, updated,
                        server=tuple(name for name in changed if name not in RESTART_ONLY),
                        needs_restart=tuple(name for name in changed if name in RESTART_ONLY))
