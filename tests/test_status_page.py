"""The status page (``/ui``) in a real browser (headless Chromium, tests/browser.py) against
the proxy under real gunicorn, with its services on the real Docker engine (the test
image): what it shows, what its buttons do, how it follows changes made elsewhere, and
what it costs the browser.

The README's screenshot, docs/status-page.png, is made by the page-weight test, run with
STATUS_PAGE_SCREENSHOTS=docs (the directory, under the repository, to keep it in):
    STATUS_PAGE_SCREENSHOTS=docs python3 -m pytest -c tests/pytest.ini --rootdir . tests/test_status_page.py -k small
"""
from __future__ import annotations

import re
import signal
import time

import docker
import pytest
import requests
import yaml
from playwright.sync_api import expect

from conftest import ROOT, free_port, service_entry
from engine_api import api, containers_of, start_ready
from registry import Registry, RegistryRelay, push_fresh_image
from status_page import LOG_PANEL, RECORD_PROGRESS, StatusPage

BACKEND_ARGS = ["--host", "0.0.0.0", "--port", "8080"]
TOKEN = "page-admin-token-51c2"
KEY = "page-api-key-9d0e"
UNAUTHORIZED = r"status of 401"  # the browser's own console line for a 401 answer
PAGE_WEIGHT_LIMIT = 200 * 1024
# Each text the playground's answer had, as it grew.
RECORD_ANSWER = """() => {
  const answer = document.getElementById("playground-answer");
  window.__answers = [];
  new MutationObserver(() => window.__answers.push(answer.textContent))
      .observe(answer, {childList: true, characterData: true, subtree: true});
}"""
# No hyphen or space to break at: the card must wrap it, not widen the page.
LONG_ALIAS = "Qwen2.5_7B_Instruct_GGUF_Q4_K_M_imatrix_calibrated_as_one_long_word"


def _slow_start(port: int, **overrides) -> dict:
    """The test image, healthy only after 2 s: long enough to see it starting."""
    return service_entry(port, args=[*BACKEND_ARGS, "--load-seconds", "2"], **overrides)


@pytest.mark.engine
def test_a_service_is_started_followed_in_its_log_and_drained_to_stopped_from_the_page(
        engine_proxy, docker_client, container_prefix, page):
    proxy = engine_proxy({"llm": _slow_start(free_port(), aliases=["llm:8b"], group="gpu0", idle_timeout=600),
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


def test_with_an_admin_token_the_page_asks_for_it_and_says_when_it_is_wrong(start_proxy, page):
    proxy = start_proxy({"llm": service_entry(free_port())}, server_extra={"admin_token": TOKEN})
    ui = StatusPage(page, proxy).open()
    dialog = page.locator("#credential-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("h2")).to_have_text("Admin token")
    page.keyboard.press("Escape")  # not now: the page says what it needs, and asks again
    expect(page.locator("#banner")).to_contain_text("The page needs the admin token")
    ui.button("Enter the admin token").click()
    expect(dialog).to_be_visible()

    dialog.get_by_label("Admin token").fill("not-the-token")
    dialog.get_by_role("button", name="Use it").click()
    error = dialog.locator("#credential-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("401 unauthorized: Invalid admin token")

    dialog.get_by_label("Admin token").fill(TOKEN)
    dialog.get_by_role("button", name="Use it").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#banner")).to_be_hidden()
    ui.expect_live()
    ui.expect_state("llm", "stopped", timeout=10)
    # Kept for this tab only, and never in a URL.
    assert page.evaluate("sessionStorage.getItem('inference-proxy.admin-token')") == TOKEN
    assert page.evaluate("localStorage.length") == 0

    page.reload()  # the same tab: not asked again
    ui.expect_live()
    ui.expect_state("llm", "stopped", timeout=10)
    expect(dialog).to_be_hidden()
    assert not [url for url in ui.requests if TOKEN in url or "not-the-token" in url]
    assert ui.errors_but(UNAUTHORIZED) == []


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
    proxy = engine_proxy({"cold": _slow_start(free_port(), autostart=True, start_timeout=60)})
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


@pytest.mark.engine
def test_the_page_is_small_self_contained_fits_a_phone_and_has_no_console_errors(
        engine_proxy, page, tmp_path):
    groups = {"gpu0": {"exclusive": True}}
    proxy = engine_proxy({
        "llama3": service_entry(free_port(), args=[*BACKEND_ARGS, "--token-delay", "0.02"],
                                aliases=["llama3:8b", "meta-llama/Meta-Llama-3-8B-Instruct"],
                                group="gpu0", autostart=True, idle_timeout="15m"),
        # never started here: the engine has no GPU to give
        "qwen": service_entry(free_port(), group="gpu0", autostart=True, resources={"gpus": ["0"]},
                              aliases=["qwen2.5:7b", LONG_ALIAS]),
        "broken": service_entry(free_port(), args=["--port", "not-a-number"]),
    }, groups=groups)
    page.set_viewport_size({"width": 1280, "height": 900})
    ui = StatusPage(page, proxy).open("/")  # / leads to the page
    assert page.url == proxy.url + "/ui"
    ui.expect_live()
    start_ready(proxy, "llama3")
    api(proxy, "POST", "/service/broken/start")
    ui.expect_state("llama3", "ready", timeout=10)
    ui.expect_state("broken", "failed", timeout=30)
    expect(ui.card("broken").locator(".log-tail")).to_contain_text("not-a-number", timeout=10_000)
    ui.button("Logs of llama3").click()
    expect(ui.card("llama3").locator(".log-lines")).to_contain_text("LISTENING 8080", timeout=20_000)
    page.get_by_label("Model").select_option("llama3")
    page.get_by_label("Message").fill("Hello")
    ui.button("Send").click()
    expect(page.locator("#playground-status")).to_have_text("done", timeout=20_000)
    ui.screenshot(tmp_path, "status-page.png", keep=True)

    # Everything came from the proxy itself, and the page's own files are small.
    assert all(url.startswith(proxy.url + "/") for url in ui.requests), ui.requests
    files = {url for url in ui.requests if url.startswith(proxy.url + "/ui")}
    weight = sum(len(requests.get(url, timeout=10).content) for url in files)
    assert {url.rsplit("/", 1)[-1] for url in files} >= {"ui", "ui.css", "main.js", "services.js"}
    assert weight < PAGE_WEIGHT_LIMIT, weight

    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(200)  # one layout
    assert ui.overflow() == 0
    ui.screenshot(tmp_path, "status-page-narrow.png")
    assert ui.errors_but() == []


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


def test_the_page_and_its_files_keep_to_the_host_and_origin_rules(start_proxy):
    proxy = start_proxy({"llm": service_entry(free_port())}, server_extra={"admin_token": TOKEN})
    page_url, script_url = f"{proxy.url}/ui", f"{proxy.url}/ui/static/js/main.js"

    # The page holds no data: it is served without the token; what it calls needs it.
    answer = requests.get(page_url, timeout=10)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/html")
    policy = answer.headers["Content-Security-Policy"]
    assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert requests.get(script_url, timeout=10).headers["Content-Type"].startswith("text/javascript")
    assert requests.get(f"{proxy.url}/api/v1/services", timeout=10).status_code == 401
    redirect = requests.get(proxy.url + "/", allow_redirects=False, timeout=10)
    assert redirect.status_code == 302 and redirect.headers["Location"] == "/ui"

    for url in (page_url, script_url):
        rebound = requests.get(url, headers={"Host": f"rebind.test:{proxy.port}"}, timeout=10)
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "host_not_allowed"
        foreign = requests.get(url, headers={"Origin": "http://127.0.0.1:1"}, timeout=10)
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "origin_not_allowed"
        embedded = requests.get(url, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
                                              "Sec-Fetch-Dest": "script"}, timeout=10)
        assert embedded.status_code == 403
    # The page's own files on disk: no build step, nothing from elsewhere.
    sources = [path for path in (ROOT / "proxy" / "ui").rglob("*") if path.is_file()]
    assert not [path for path in sources if re.search(rb"https?://", path.read_bytes().replace(
        b"http://www.w3.org/2000/svg", b""))]
