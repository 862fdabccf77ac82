"""Token counts and generation speed, read once from the last bytes of an answer.

OpenAI-style servers put ``usage`` at the end: the last object of a JSON answer, and the
last event of a stream asked for it (``stream_options.include_usage``). llama-server also
puts ``timings`` there, in every final event and answer (its JSON keys are sorted, and
``timings`` and ``usage`` sort last). So nothing is looked at while the answer streams:
the relay keeps references to its last chunks, and once the answer has ended, only the
objects after the last ``"usage"`` and ``"timings"`` keys in those bytes are decoded. A key
is only a key when a colon follows it (inside a JSON string its quotes are escaped).
"""
from __future__ import annotations

import json
import math
from typing import NamedTuple

TAIL_BYTES = 16 * 1024  # how far from the end the keys are looked for
_USAGE = b'"usage"'
_TIMINGS = b'"timings"'
_TRIES = 3  # occurrences of a key tried, from the last, before giving up
_decoder = json.JSONDecoder()


class Usage(NamedTuple):
    prompt: int | None
    completion: int | None
    per_second: float | None  # llama-server's timings.predicted_per_second


def read_usage(tail: bytes) -> Usage:
    """What the end of an answer says about its tokens; None for what it does not say.

    ``usage`` gives the counts (``prompt_tokens``/``completion_tokens``, or the Responses
    API's ``input_tokens``/``output_tokens``); without it llama-server's ``timings`` do
    (``cache_n`` + ``prompt_n`` prompt tokens, ``predicted_n`` generated).
    """
    if len(tail) > TAIL_BYTES:
        tail = tail[-TAIL_BYTES:]
    prompt = completion = per_second = None
    usage = _object_after_last(tail, _USAGE)
    if usage is not None:
        prompt = _count(usage, "prompt_tokens", "input_tokens")
        completion = _count(usage, "completion_tokens", "output_tokens")
    timings = _object_after_last(tail, _TIMINGS)
    if timings is not None:
        if usage is None:
            processed, cached = _count(timings, "prompt_n"), _count(timings, "cache_n")
            prompt = None if processed is None else processed + (cached or 0)
            completion = _count(timings, "predicted_n")
        rate = timings.get("predicted_per_second")
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0:
            per_second = float(rate)
    return Usage(prompt, completion, per_second)


def _object_after_last(tail: bytes, key: bytes) -> dict | None:
    end = len(tail)
    for _ in range(_TRIES):
        at = tail.rfind(key, 0, end)
        if at < 0:
            return None
        end = at
        rest = tail[at + len(key):].lstrip()
        if rest[:1] != b":":
            continue  # a string value that happens to read "usage", not a key
        try:
            value, _ = _decoder.raw_decode(rest[1:].lstrip().decode("utf-8", "replace"))
        except ValueError:
            continue  # cut off (the tail began inside it, or the answer broke off)
        if isinstance(value, dict):
            return value
    return None


def _count(values: dict, *names: str) -> int | None:
    for name in names:
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None
