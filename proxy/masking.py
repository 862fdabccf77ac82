"""The configured secrets (``Config.secrets``: the admin token, the API keys, registry
passwords and what ``${VAR}`` brought in from the environment) masked in text the proxy
hands on: its own log lines, and a container's log lines, which may print them."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Iterable

REDACTED = "***"


def secrets_pattern(values: Iterable[str]) -> re.Pattern | None:
    """One pattern matching any of the values, the longest first (so a secret that holds
    another is masked whole); None when there are none."""
    ordered = sorted({value for value in values if value}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


@lru_cache(maxsize=8)  # keyed by the set of secrets: a reloaded config gets its own
def masker(secrets: frozenset[str]) -> Callable[[str], str]:
    """A function that masks these secrets in a text."""
    pattern = secrets_pattern(secrets)
    if pattern is None:
        return lambda text: text
    return lambda text: pattern.sub(REDACTED, text)
