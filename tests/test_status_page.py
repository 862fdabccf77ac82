"""The status page (``/ui``) in a real browser (headless Chromium, tests/browser.py) against
the proxy under real gunicorn, with its services on the real Docker engine (the test
image): the cards and what their buttons do, and how the page follows changes made
elsewhere. The playground: test_status_page_playground.py; credentials, origin rules,
weight and width: test_status_page_safety.py.
"""
from __future__ import annotations

import re
import signal
import time

import docker
import pytest
import yaml
from playwright.sync_api import expect

from conftest import free_port, service_entry
from engine_api import api, containers_of, start_ready
from registry import Registry, RegistryRelay, push_fresh_image
from status_page import LOG_PANEL, RECORD_PROGRESS, StatusPage, slow_start


@pytest.mark.engine
def test_a_service_is_started_followed_in_its_log_and_drained_to_stopped_from_the_page(
        engine_proxy, docker_client, container_prefix, page):
    proxy = engine_proxy({"llm": slow_start(free_port(), aliases=["llm:8b"], group="gpu0", idle_timeout=600),
                          "other": service_entry(free_port(), autostart=True)},
                         groups={"gpu0": {"exclusive": True}})
    ui = StatusPage(page, proxy).open()
    ui.expect_live()
    ui.expect_state("llm", "stopped")
    ui.expect_state("other", "stopped")
    llm = ui.card("llm")
    expect(llm).to_contain_text("also: llm:8b")
    expect(llm).to_contain_text("gpu0 (exclusive)")
    expect(ui.card("other").locator('[data-field="autostart"]')).to_have_text("yes")

    # By keyboard: Tab reaches the button, its focus ring shows, Enter presses it.
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.getAttribute('aria-label')") == "Start llm":
            break
    else:
        raise AssertionError("Tab never reached the start button")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    page.keyboard.press("Enter")
    ui.expect_state("llm", "ready")
    assert [state for state, _ in ui.states("llm")] == ["stopped", "starting", "ready"]
    expect(llm.locator('[data-field="container"]')).to_contain_text("(running)")
    expect(llm.locator('[data-field="idle"]')).to_contain_text(re.compile(r"in \d+m \d+s"))

    ui.button("Logs of llm").click()
    expect(llm.locator(".log-lines")).to_contain_text("LISTENING 8080", timeout=20_000)

    ui.button("Stop llm").click()
    dialog = page.locator("#stop-dialog")
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")  # changed my mind: nothing happens
    expect(dialog).to_be_hidden()
    page.wait_for_timeout(500)
    ui.expect_state("llm", "ready", timeout=1)
    ui.button("Stop llm").click()
    dialog.get_by_role("button", name="Drain, then stop").click()
    ui.expect_state("llm", "stopped", timeout=30)
    assert "stop llm requested\n" in proxy.log()  # with its drain (else "(no drain)")
    assert containers_of(docker_client, container_prefix) == []
    expect(llm.locator(".logs-state")).to_have_text("ended: the container stopped", timeout=10_000)
    assert ui.errors_but() == []


@pytest.mark.engine
def test_a_failed_start_shows_its_reason_exit_code_and_log_tail(engine_proxy, page):
    proxy = engine_proxy({"broken": service_entry(free_port(), args=["--port", "not-a-number"])})
    ui = StatusPage(page, proxy).open()
    ui.expect_live()
    ui.button("Start broken").click()
    ui.expect_state("broken", "failed", timeout=30)
    failure = ui.card("broken").locator('[data-field="failure"]')
    expect(failure.locator(".failure-reason")).to_contain_text("container_exited")
    expect(failure.locator(".failure-reason")).to_contain_text("exit code 2")
    expect(failure.locator(".log-tail")).to_contain_text("invalid int value: 'not-a-number'", timeout=10_000)
    expect(ui.button("Start broken")).to_be_enabled()  # it may be tried again
    assert ui.errors_but() == []


@pytest.fixture
def image_to_pull(tmp_path, docker_client, container_prefix):
    """An image no Docker host has yet (the test image and 8 random MB), in a real registry
    (tests/registry.py) behind a relay that hands it out at 2 MB a second: about 4 s of pull."""
    registry = Registry(tmp_path / "registry")
    relay = RegistryRelay(registry.port)
    relay.rate = 2 << 20
    _, tag, _ = push_fresh_image(docker_client, registry, size_mb=8)
    reference = f"{relay.host}/ipt/backend:{tag}"
    yield reference
    for found in containers_of(docker_client, container_prefix):
        found.remove(force=True)  # before the image it uses
    try:
        docker_client.images.remove(reference, force=True)
    except docker.errors.ImageNotFound:
        pass  # never pulled: the test failed before
    relay.stop()
    registry.stop()


@pytest.mark.engine
def test_a_pulling_service_shows_its_progress_as_a_bar_then_starts(engine_proxy, image_to_pull, page):
    proxy = engine_proxy({"pulled": service_entry(free_port(), image=image_to_pull)})
    ui = StatusPage(page, proxy).open()
    ui.expect_live()
    page.evaluate(RECORD_PROGRESS)
    ui.button("Start pulled").click()
    ui.expect_state("pulled", "pulling", timeout=10)
    card = ui.card("pulled")
    expect(card.locator('[data-field="progress"]')).to_be_visible()
    expect(card.locator(".progress-text")).to_contain_text(re.compile(r"layers \d+/\d+ · .* of .* · \d+%"))
    ui.expect_state("pulled", "ready", timeout=60)
    expect(card.locator('[data-field="progress"]')).to_be_hidden()
    values = [value for value in page.evaluate("window.__progress") if value is not None]
    assert len(set(values)) >= 2 and values == sorted(values), values  # the bar moved on, never back
    assert [state for state, _ in ui.states("pulled")] == ["stopped", "pulling", "starting", "ready"]
    assert ui.errors_but() == []


@pytest.mark.engine
def test_the_page_follows_changes_made_through_the_api_within_a_second(engine_proxy, page):
    proxy = engine_proxy({"llm": service_entry(free_port())})
    ui = StatusPage(page, proxy).open()
    ui.expect_live()
    ui.expect_state("llm", "stopped")

    start_ready(proxy)
    ready_at = time.time()
    ui.expect_state("llm", "ready", timeout=5)
    stopped = api(proxy, "POST", "/service/llm/stop", params={"drain": "false"})
    assert stopped.status_code == 200, stopped.text
    stopped_at = time.time()
    ui.expect_state("llm", "stopped", timeout=5)

    shown = dict(ui.states("llm")[1:])  # each state the page showed, when
    assert shown["ready"] - ready_at < 1.0, (shown, ready_at)
    assert shown["stopped"] - stopped_at < 1.0, (shown, stopped_at)
    # Followed, not polled: while nothing changes the page asks for nothing.
    page.wait_for_timeout(1000)  # the reads that followed the last event
    asked = len(ui.requests)
    page.wait_for_timeout(4000)
    assert ui.requests[asked:] == []
    assert ui.errors_but() == []


@pytest.mark.engine
def test_the_page_reconnects_by_itself_when_the_proxy_restarts(engine_proxy, page):
    port, services = free_port(), {"llm": service_entry(free_port())}
    proxy = engine_proxy(services, port=port)
    ui = StatusPage(page, proxy).open()
    ui.expect_live()
    proxy.proc.terminate()
    proxy.proc.wait(30)
    expect(page.locator("#connection")).to_have_text("reconnecting…", timeout=10_000)

    again = engine_proxy(services, port=port)
    ui.expect_live(timeout=30)
    start_ready(again)
    ui.expect_state("llm", "ready", timeout=5)
    # While the proxy was away the browser said so; nothing else went wrong.
    assert ui.errors_but(r"net::ERR_") == []


def test_a_reload_that_adds_and_removes_services_shows_on_the_page(start_proxy, page):
    proxy = start_proxy({"llm": service_entry(free_port()), "old": service_entry(free_port())})
    ui = StatusPage(page, proxy).open()
    ui.expect_live()
    expect(page.locator("li.card")).to_have_count(2)
    config = yaml.safe_load(proxy.config_path.read_text())
    del config["services"]["old"]
    config["services"]["new"] = service_entry(free_port(), aliases=["new:1b"])
    proxy.config_path.write_text(yaml.safe_dump(config))
    proxy.proc.send_signal(signal.SIGHUP)
    expect(ui.card("new")).to_contain_text("also: new:1b", timeout=20_000)
    expect(page.locator("li.card")).to_have_count(2)
    expect(ui.card("old")).to_have_count(0)
    expect(page.get_by_label("Model").locator("option")).to_have_count(3, timeout=10_000)  # llm, new, new:1b
    assert ui.errors_but(r"net::ERR_") == []


def test_the_log_panel_keeps_the_last_5000_lines_and_holds_still_while_paused(start_proxy, page):
    """The panel itself, fed more lines than a test container prints in reasonable time."""
    proxy = start_proxy({"llm": service_entry(free_port())})
    ui = StatusPage(page, proxy).open()
    result = page.evaluate(LOG_PANEL, [6000, 300])
    assert result["max"] == 5000 and result["kept"] == 5000, result
    assert result["first"] == [5000, "line 1000", "line 5999"], result
    assert result["paused"] == [5000, "line 5999"] and result["said"] == "paused · 300 new lines", result
    assert result["resumed"] == [5000, "line 1300", "line 6299"], result
    assert ui.errors_but() == []
