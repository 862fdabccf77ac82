"""Command line: ``python -m proxy check|serve [--config PATH]``.

``check`` validates the config and prints a short summary (exit 0) or the problems, one a
line (exit 1). ``serve`` runs gunicorn with the shipped gunicorn.conf.py on that config.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, Config, config_path, load_config

_ROOT = Path(__file__).resolve().parent.parent


def summary(config: Config) -> str:
    lines = [f"{config.source}: OK",
             f"server: {config.server.host}:{config.server.port} (log level {config.server.log_level})",
             f"services: {len(config.services)}"]
    for service in config.services.values():
        gpus = service.resources.gpus
        gpus_text = "none" if gpus is None else ",".join(gpus) if isinstance(gpus, tuple) else str(gpus)
        lines.append(f"  {service.id}: image {service.image}, port 127.0.0.1:{service.port} -> "
                     f"{service.container_port}, gpus {gpus_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check", "serve"])
    parser.add_argument("--config", help="config file (default: $PROXY_CONFIG or ./config.yaml)")
    args = parser.parse_args(argv)
    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    if args.command == "check":
        print(summary(config))
        return 0
    os.environ["PROXY_CONFIG"] = os.path.abspath(path)
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "-c", str(_ROOT / "gunicorn.conf.py"),
                               "--chdir", str(_ROOT), "wsgi:app"])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
