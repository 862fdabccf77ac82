"""A real headless browser for the tests: Debian's Chromium (``/usr/bin/chromium``, installed
by tests/setup/ensure_browser.sh) driven by Playwright, and a web server of the test's own
for the pages it loads.

Never ``playwright install``: it downloads a browser build, which the test machines cannot
reach. A missing Chromium or Playwright skips on a developer's machine and fails in CI.

Fixtures (registered for every test module by conftest's ``pytest_plugins``):
  ``browser``      one Chromium for the session
  ``page``         a fresh page in a context of its own (no shared cache or cookies)
  ``page_server``  serves HTML pages from 127.0.0.1 on a port of its own: another origin
                   than the proxy's
"""
from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import skip_outside_ci

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox refuses to start
    "--no-proxy-server",
    # The machine reaches no network: without these Chromium keeps trying its services.
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    # Names under .test resolve to this machine, so a page can play a DNS-rebinding attacker.
    "--host-resolver-rules=MAP *.test 127.0.0.1",
]


@pytest.fixture(scope="session")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        skip_outside_ci(f"{CHROMIUM} is missing: run tests/setup/ensure_browser.sh")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_outside_ci("Playwright is missing: pip install -r tests/requirements.txt")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS,
                                              timeout=60_000)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


class PageServer:
    """Serves ``pages`` (path -> HTML) on 127.0.0.1; other paths are 404."""

    def __init__(self):
        self.pages: dict[str, str] = {}
        pages = self.pages

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                html = pages.get(self.path.partition("?")[0])
                body = (html or "not found").encode()
                self.send_response(200 if html is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, path: str, html: str) -> str:
        """Serve ``html`` at ``path``; its URL."""
        self.pages[path] = html
        return f"{self.origin}{path}"

    def close(self) -> None:
        if not self.thread.is_alive():
            return  # closed already (a test may close it early)
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def page_server():
    server = PageServer()
    yield server
    server.close()
