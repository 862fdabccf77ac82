"""The status page as an admin surface, in a real browser against the proxy under real
gunicorn: the admin token asked for and kept in the tab only, the Host and Origin rules and
the CSP of the page and its files, and what the page costs (weight, requests elsewhere,
console errors, width on a phone).

The README's screenshot, docs/status-page.png, is made by the page-weight test, run with
STATUS_PAGE_SCREENSHOTS=docs (the directory, under the repository, to keep it in):
    STATUS_PAGE_SCREENSHOTS=docs python3 -m pytest -c tests/pytest.ini --rootdir . tests/test_status_page_safety.py -k small
"""
from __future__ import annotations

import re

import pytest
import requests
from playwright.sync_api import expect

from conftest import ROOT, free_port, service_entry
from engine_api import api, start_ready
from status_page import BACKEND_ARGS, StatusPage, UNAUTHORIZED

TOKEN = "page-admin-token-51c2"
PAGE_WEIGHT_LIMIT = 200 * 1024
# No hyphen or space to break at: the card must wrap it, not widen the page.
LONG_ALIAS = "Qwen2.5_7B_Instruct_GGUF_Q4_K_M_imatrix_calibrated_as_one_long_word"


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
