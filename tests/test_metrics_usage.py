"""Reading token counts and speed from the last bytes of an answer (proxy.metrics.usage):
only real ``usage``/``timings`` keys count, whatever the text around them says."""
from __future__ import annotations

import json

from proxy.metrics.usage import TAIL_BYTES, Usage, read_usage

TIMINGS = {"cache_n": 3, "prompt_n": 9, "prompt_ms": 12.5, "prompt_per_token_ms": 1.4, "prompt_per_second": 720.0,
           "predicted_n": 5, "predicted_ms": 100.0, "predicted_per_token_ms": 20.0, "predicted_per_second": 50.0}


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_a_json_answer_gives_its_usage_and_speed():
    body = json.dumps({"choices": [{"message": {"content": "hi"}}], "timings": TIMINGS,
                       "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}).encode()
    assert read_usage(body) == Usage(12, 5, 50.0)


def test_a_streams_last_events_give_usage_and_speed():
    tail = (event({"choices": [{"delta": {}, "finish_reason": "stop"}]})
            + event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}, "timings": TIMINGS})
            + b"data: [DONE]\n\n")
    assert read_usage(tail) == Usage(7, 2, 50.0)


def test_without_usage_llama_servers_timings_give_the_counts():
    tail = event({"choices": [{"delta": {}, "finish_reason": "stop"}], "timings": TIMINGS}) + b"data: [DONE]\n\n"
    assert read_usage(tail) == Usage(3 + 9, 5, 50.0)  # cached + processed prompt tokens


def test_the_responses_api_names_count_too():
    assert read_usage(b'{"usage": {"input_tokens": 4, "output_tokens": 6}}') == Usage(4, 6, None)


def test_words_inside_strings_are_not_keys():
    text = 'as JSON: "usage": {"prompt_tokens": 999, "completion_tokens": 999}, "timings": {"predicted_per_second": 1}'
    tail = event({"choices": [{"delta": {"content": text}}], "object": "usage"}) + b"data: [DONE]\n\n"
    assert read_usage(tail) == Usage(None, None, None)


def test_a_cut_off_last_object_falls_back_to_the_one_before():
    whole = event({"usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    cut = b'data: {"usage": {"prompt_tokens": 50, "compl'
    assert read_usage(whole + cut) == Usage(1, 2, None)


def test_only_the_end_of_a_long_answer_is_looked_at():
    usage = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "text": "'
    assert read_usage(usage + b"x" * TAIL_BYTES + b'"}') == Usage(None, None, None)
    assert read_usage(usage + b"x" * (TAIL_BYTES // 2) + b'"}') == Usage(1, 2, None)


def test_nonsense_counts_are_ignored():
    assert read_usage(b'{"usage": {"prompt_tokens": -1, "completion_tokens": true}}') == Usage(None, None, None)
    assert read_usage(b'{"timings": {"predicted_per_second": NaN}}') == Usage(None, None, None)
    assert read_usage(b'{"usage": null}') == Usage(None, None, None)
    assert read_usage(b"\xff\xfe not text at all") == Usage(None, None, None)
