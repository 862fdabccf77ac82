"""Reading a test backend's event stream to its end, and saying how it ended."""
from __future__ import annotations

import json

import requests


def read_sse(url: str, params: dict, on_first_event=None, timeout: float = 30) -> dict:
    """Read one event stream to its end; say what arrived and how it ended.

    ``clean_end`` is true only when the HTTP body ended properly (final chunk); a cut
    connection leaves it false and puts the exception in ``error``.
    """
    result = {"status": None, "seqs": [], "done": False, "clean_end": False, "error": None}
    try:
        with requests.get(url, params=params, stream=True, timeout=timeout) as response:
            result["status"] = response.status_code
            buffer = b""
            for chunk in response.iter_content(chunk_size=None):
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if event == b"data: [DONE]":
                        result["done"] = True
                    elif event.startswith(b"data: "):
                        result["seqs"].append(json.loads(event[6:])["seq"])
                        if on_first_event is not None and len(result["seqs"]) == 1:
                            on_first_event()
            result["clean_end"] = buffer == b""
    except requests.RequestException as exc:
        result["error"] = repr(exc)
    return result


def assert_complete(result: dict, events: int) -> None:
    assert result["status"] == 200 and result["error"] is None, result
    assert result["seqs"] == list(range(events)), result
    assert result["done"] and result["clean_end"], result
