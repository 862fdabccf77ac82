"""``${VAR}`` expansion for the string values of a parsed config document.

Syntax (a small, predictable subset of what docker compose does):

- ``${NAME}``: the value of NAME; an error when NAME is not set (empty is fine).
- ``${NAME:-default}``: the value of NAME, or ``default`` when NAME is unset or empty.
  The default is literal text (no nested references) and cannot contain ``}``.
- ``$${``: a literal ``${``, so ``$${NAME}`` stays ``${NAME}``.
- Any other ``$`` is literal text (``$NAME`` without braces is not expanded).

Expansion runs on the parsed document, not the raw text, so a value with quotes, colons
or newlines cannot change the YAML structure. Problems are returned, never raised, and
never contain the expanded values: they may be secrets.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

# Order matters: the escape must win over a reference starting one character later.
_TOKEN = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)\}|\$\{")
_REFERENCE = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)

INVALID_REFERENCE = (
    "Invalid variable reference; use ${NAME} or ${NAME:-default} (write $${ for a literal ${)."
)


def unset_message(name: str) -> str:
    return f"Environment variable '{name}' is not set (use ${{{name}:-default}} for a default)."


def expand(text: str, environ: Mapping[str, str], taken: set[str] | None = None) -> tuple[str, list[str]]:
    """Expand the references in one string. Returns (result, problems).

    A reference that cannot be expanded becomes the empty string, so the caller can keep
    validating the rest of the document and report everything at once. ``taken`` collects
    every value that came from the environment (not defaults): they may be secrets.
    """
    problems: list[str] = []

    def replace(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        body = match.group("body")
        ref = _REFERENCE.fullmatch(body) if body is not None else None
        if ref is None:
            problems.append(INVALID_REFERENCE)
            return ""
        name, default = ref.group("name"), ref.group("default")
        value = environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            problems.append(unset_message(name))
            return ""
        if taken is not None and value:
            taken.add(value)
        return value

    if "$" not in text:  # the common case: nothing to do
        return text, []
    result = _TOKEN.sub(replace, text)
    return result, list(dict.fromkeys(problems))  # the same variable twice: one message


def expand_tree(document, environ: Mapping[str, str]):
    """Expand every string value in a tree of dicts and lists (keys are left alone).

    Returns (expanded copy, [(path, problem), ...], {values taken from the environment})
    where path is a tuple of keys and list indices. YAML anchors can make a tree share
    nodes (or contain itself); each node is expanded once, which keeps "billion laughs"
    documents and cycles cheap and finite.
    """
    problems: list[tuple[tuple, str]] = []
    taken: set[str] = set()
    done: dict[int, object] = {}  # id(original container) -> its expanded copy

    def walk(node, path: tuple):
        if isinstance(node, str):
            value, found = expand(node, environ, taken)
            problems.extend((path, message) for message in found)
            return value
        if not isinstance(node, (dict, list)):
            return node
        if id(node) in done:
            return done[id(node)]
        if isinstance(node, dict):
            copy: dict | list = {}
            done[id(node)] = copy  # registered before recursing, so a cycle ends here
            for key, value in node.items():
                copy[key] = walk(value, path + (key,))
        else:
            copy = []
            done[id(node)] = copy
            for index, value in enumerate(node):
                copy.append(walk(value, path + (index,)))
        return copy

    return walk(document, ()), problems, taken
