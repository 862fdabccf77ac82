"""The status page's playground in a real browser against the proxy under real gunicorn:
an answer streamed token by token from the test backend, with its timings, behind an API
key; a stopped ``autostart`` model loading on the real Docker engine.
"""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from conftest import free_port, service_entry
from status_page import RECORD_ANSWER, StatusPage, UNAUTHORIZED, slow_start

KEY = "page-api-key-9d0e"


def test_the_playground_streams_an_answer_token_by_token_with_its_timings(start_backend, start_proxy, page):
    backend = start_backend("--token-delay", "0.05")
    proxy = start_proxy({"llm": service_entry(backend.port, aliases=["llm:8b"])}, server_extra={"api_keys": [KEY]})
    ui = StatusPage(page, proxy).open()
    ui.expect_live()
    # The admin API is open, the models are not: the page asks for an API key.
    ui.button("API key…").click()
    dialog = page.locator("#credential-dialog")
    dialog.get_by_label("API key").fill(KEY)
    dialog.get_by_role("button", name="Use it").click()
    model = page.get_by_label("Model")
    expect(model.locator("option")).to_have_count(2)
    model.select_option("llm:8b")
    page.get_by_label("Message").fill("Hello there")
    answer = page.locator("#playground-answer")
    page.evaluate(RECORD_ANSWER)
    ui.button("Send").click()

    expected = "".join(f"tok{i} " for i in range(16))
    expect(answer).to_have_text(expected, timeout=20_000)
    seen = page.evaluate("window.__answers")
    assert len(seen) >= 8 and seen[0] == "tok0 ", seen[:5]  # it grew token by token
    expect(page.locator("#playground-ttft")).to_have_text(re.compile(r"^\d+ ms$"))
    expect(page.locator("#playground-rate")).to_have_text(re.compile(r"^\d+\.\d$"))
    rate = float(page.locator("#playground-rate").text_content())
    assert 5 < rate < 40, rate  # 20 tokens a second from the backend, give or take
    expect(page.locator("#playground-tokens")).to_have_text("16")
    expect(page.locator("#playground-status")).to_have_text("done")
    assert ui.errors_but(UNAUTHORIZED) == []


@pytest.mark.engine
def test_a_stopped_autostart_model_shows_loading_in_the_playground_then_answers(engine_proxy, page):
    proxy = engine_proxy({"cold": slow_start(free_port(), autostart=True, start_timeout=60)})
    ui = StatusPage(page, proxy).open()
    ui.expect_live()
    ui.expect_state("cold", "stopped")
    page.get_by_label("Message").fill("Wake up")
    ui.button("Send").click()
    expect(page.locator("#playground-status")).to_have_text("loading the model…")
    expect(page.locator("#playground-answer")).to_contain_text("tok0 tok1", timeout=60_000)
    expect(page.locator("#playground-status")).to_have_text("done")
    ui.expect_state("cold", "ready", timeout=10)
    ui.button("Stop cold").click()
    page.locator("#stop-dialog").get_by_role("button", name="Stop now").click()
    ui.expect_state("cold", "stopped", timeout=30)
    assert "stop cold requested (no drain)" in proxy.log()
    assert ui.errors_but() == []
