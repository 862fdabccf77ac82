"""The proxy's configuration: the dataclasses (``model``), the value forms (``fields``), the
schemas and cross-field checks (``schema``), and reading a file into them (``load``)."""
from .fields import SERVICE_ID, parse_duration, parse_size
from .load import config_path, load_config, load_config_text
from .model import (DEFAULT_MAX_QUEUE, LOCAL_ENGINE, LOG_LEVELS, SERVICE_TYPES, Config, ConfigError, EngineConfig,
                    GroupConfig, Resources, ServerConfig, ServiceConfig, Timeouts, TlsFiles, Volume)

__all__ = [
    "Config", "ConfigError", "DEFAULT_MAX_QUEUE", "EngineConfig", "GroupConfig", "LOCAL_ENGINE", "TlsFiles", "LOG_LEVELS", "Resources", "SERVICE_ID",
    "SERVICE_TYPES", "ServerConfig", "ServiceConfig", "Timeouts", "Volume", "config_path", "load_config",
    "load_config_text", "parse_duration", "parse_size",
]
