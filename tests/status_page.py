"""Helpers for driving the status page (``/ui``) in the real browser (tests/browser.py)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from playwright.sync_api import expect

from conftest import ROOT, service_entry

# Set to a directory (say, docs) to write the screenshots there too, for the README.
SCREENSHOT_DIR = os.environ.get("STATUS_PAGE_SCREENSHOTS")
BACKEND_ARGS = ["--host", "0.0.0.0", "--port", "8080"]
UNAUTHORIZED = r"status of 401"  # the browser's own console line for a 401 answer


def slow_start(port: int, **overrides) -> dict:
    """The test image, healthy only after 2 s: long enough to see it starting."""
    return service_entry(port, args=[*BACKEND_ARGS, "--load-seconds", "2"], **overrides)


# Each badge's changes, with the browser's clock: [service id, state, epoch ms].
RECORD_STATES = """
window.__states = [];
const last = {};
new MutationObserver(() => {
  for (const badge of document.querySelectorAll("li.card .badge")) {
    const id = badge.closest("li.card").dataset.service;
    if (badge.textContent && badge.textContent !== last[id]) {
      last[id] = badge.textContent;
      window.__states.push([id, badge.textContent, Date.now()]);
    }
  }
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""


# Each text the playground's answer had, as it grew.
RECORD_ANSWER = """() => {
  const answer = document.getElementById("playground-answer");
  window.__answers = [];
  new MutationObserver(() => window.__answers.push(answer.textContent))
      .observe(answer, {childList: true, characterData: true, subtree: true});
}"""

# Each value the pull bars showed (null: not known yet).
RECORD_PROGRESS = """() => {
  window.__progress = [];
  new MutationObserver(() => {
    for (const bar of document.querySelectorAll("li.card progress")) {
      const value = bar.hasAttribute("value") ? bar.value : null;
      if (value !== window.__progress.at(-1)) window.__progress.push(value);
    }
  }).observe(document.getElementById("services"), {subtree: true, childList: true, characterData: true,
                                                    attributes: true});
}"""

# The page's own log panel, fed a body of `count` lines, then `more` while paused; what it
# kept and showed at each step.
LOG_PANEL = r"""async ([count, more]) => {
  const { LogPanel, MAX_LINES } = await import("/ui/static/js/logs.js");
  const section = document.querySelector("#service-template").content.querySelector(".logs").cloneNode(true);
  document.body.append(section);
  const panel = new LogPanel("llm", section);
  const body = (from, to) => new Response(Array.from({length: to - from}, (_, i) => `line ${from + i}\n`).join(""));
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
  await panel.consume(body(0, count));
  await frame();
  const first = section.querySelector(".log-lines").textContent.split("\n");
  section.querySelector('[data-action="pause"]').click();
  await panel.consume(body(count, count + more));
  await frame();
  const paused = section.querySelector(".log-lines").textContent.split("\n");
  const said = section.querySelector(".logs-state").textContent;
  section.querySelector('[data-action="pause"]').click();
  await frame();
  const resumed = section.querySelector(".log-lines").textContent.split("\n");
  return { max: MAX_LINES, kept: panel.lines.length, first: [first.length, first[0], first.at(-1)],
           paused: [paused.length, paused.at(-1)], said, resumed: [resumed.length, resumed[0], resumed.at(-1)] };
}"""


class StatusPage:
    """The page of one proxy in one browser tab, with what the browser said meanwhile."""

    def __init__(self, page, proxy):
        self.page = page
        self.proxy = proxy
        self.console: list[str] = []  # console errors and uncaught exceptions
        self.requests: list[str] = []  # every URL the page asked for
        page.on("console", lambda message: message.type == "error" and self.console.append(message.text))
        page.on("pageerror", lambda error: self.console.append(f"uncaught: {error}"))
        page.on("request", lambda sent: self.requests.append(sent.url))
        page.add_init_script(RECORD_STATES)

    def open(self, path: str = "/ui"):
        self.page.goto(self.proxy.url + path)
        return self

    def card(self, service_id: str):
        return self.page.locator(f'li.card[data-service="{service_id}"]')

    def badge(self, service_id: str):
        return self.card(service_id).locator(".badge")

    def button(self, name: str):
        return self.page.get_by_role("button", name=name, exact=True)

    def expect_state(self, service_id: str, state: str, timeout: float = 60):
        expect(self.badge(service_id)).to_have_text(state, timeout=timeout * 1000)

    def expect_live(self, timeout: float = 20):
        expect(self.page.locator("#connection")).to_have_text("live", timeout=timeout * 1000)

    def states(self, service_id: str) -> list[tuple[str, float]]:
        """(state, epoch seconds) of each change of the service's badge."""
        return [(state, ms / 1000) for sid, state, ms in self.page.evaluate("window.__states") if sid == service_id]

    def log_text(self, service_id: str) -> str:
        return self.card(service_id).locator(".log-lines").text_content()

    def errors_but(self, *allowed: str) -> list[str]:
        """Console errors, less those matching one of the ``allowed`` patterns."""
        return [text for text in self.console if not any(re.search(pattern, text) for pattern in allowed)]

    def screenshot(self, directory: Path, name: str, keep: bool = False) -> Path:
        """Into ``directory``; with ``keep``, into $STATUS_PAGE_SCREENSHOTS too (when set)."""
        path = directory / name
        self.page.screenshot(path=str(path), full_page=True)
        if keep and SCREENSHOT_DIR:
            kept = ROOT / SCREENSHOT_DIR / name
            kept.parent.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(kept), full_page=True)
        return path

    def overflow(self) -> int:
        """Pixels the page is wider than the window (0: no horizontal scrolling)."""
        return self.page.evaluate(
            "Math.max(document.documentElement.scrollWidth, document.body.scrollWidth) - window.innerWidth")
