"""Web pages in a real browser (headless Chromium) against the proxy under real gunicorn:
a page of another origin, and a page whose name was rebound to 127.0.0.1, can neither start
a container, nor reach a backend, nor read an answer; a page of an allowed origin works
through CORS, preflights included.

Containers run on the real Docker engine (the test image); what the pages must not reach is
checked there and in the backends' own request counts (``/_stats``).
"""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import requests

from conftest import free_port, service_entry, wait_until
from engine_api import containers_of, start_ready

REQUEST_LINE = re.compile(r"\| DEBUG +\| ([A-Z]+) (\S+) -> (\d+) in ")
CHAT = {"model": "cold", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
# A text/plain form whose body is JSON: the name is the text up to '=', the value the rest.
JSON_FORM_FIELD = """<input type="hidden" name='{"model": "cold", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], "pad": "' value='"}'>"""


def _stats(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/_stats", timeout=5).json()


def _requests_ended(page) -> list:
    """(method, URL) of every request the page sends, once it has ended: answered, or
    dropped by the browser (which keeps a refused image or script from the page)."""
    ended = []
    page.on("requestfinished", lambda sent: ended.append((sent.method, sent.url)))
    page.on("requestfailed", lambda sent: ended.append((sent.method, sent.url)))
    return ended


def _wait_for(page, ended: list, prefix: str, count: int, what: str) -> list:
    for _ in range(300):
        mine = [(method, url.removeprefix(prefix)) for method, url in ended if url.startswith(prefix)]
        if len(mine) >= count:
            return mine
        page.wait_for_timeout(100)  # lets Playwright deliver its events meanwhile
    raise AssertionError(f"the page made {len(mine)} of the {count} requests expected ({what}): {ended}")


def _answered_by_the_proxy(proxy, log_from: int) -> Counter:
    """(method, path, status) of each request the proxy answered since log_from (its DEBUG line)."""
    return Counter(REQUEST_LINE.findall(proxy.log()[log_from:]))


# -- a page of another origin -------------------------------------------------------------------

def _attack_page(proxy_url: str) -> str:
    """Simple requests, which need no preflight: no-cors fetches with a text/plain JSON body,
    forms posted into iframes, and GETs embedded without an Origin (an autostart service
    starts on any request), all sent as the page loads; and a link to follow."""
    paths = ["/v1/chat/completions", "/api/v1/service/cold/start", "/service/cold/v1/chat/completions",
             "/service/live/v1/chat/completions"]
    fetches = "\n".join(f'fetch("{proxy_url}{path}", {{method: "POST", mode: "no-cors", '
                        f'headers: {{"Content-Type": "text/plain"}}, body}});' for path in paths)
    forms = [("/v1/chat/completions", 'enctype="text/plain"', JSON_FORM_FIELD),
             ("/api/v1/service/cold/start", "", ""),
             ("/service/live/v1/chat/completions", 'enctype="text/plain"', JSON_FORM_FIELD)]
    frames = "".join(f'<iframe name="sink{i}"></iframe>' for i in range(len(forms)))
    form_html = "".join(f'<form method="post" target="sink{i}" {enctype} action="{proxy_url}{path}">{field}</form>'
                        for i, (path, enctype, field) in enumerate(forms))
    embeds = (f'<img src="{proxy_url}/service/cold/v1/models"><iframe src="{proxy_url}/service/cold/health"></iframe>'
              f'<script src="{proxy_url}/service/live/v1/models"></script>'
              f'<a id="link" href="{proxy_url}/healthz">the proxy</a>')
    return f"""<!doctype html><html><body>{embeds}{frames}{form_html}<script>
const body = {json.dumps(json.dumps(CHAT))};
{fetches}
for (const form of document.forms) form.submit();
</script></body></html>"""


@pytest.mark.engine
def test_a_page_of_another_origin_starts_no_container_and_reaches_no_backend(
        engine_proxy, docker_client, container_prefix, page, page_server):
    live_port = free_port()
    proxy = engine_proxy({"cold": service_entry(free_port(), autostart=True, start_timeout=60),
                          "live": service_entry(live_port)})
    start_ready(proxy, "live")  # a running backend the page aims at too
    live_before = _stats(live_port)["requests"]

    log_from = len(proxy.log())
    ended = _requests_ended(page)
    page.goto(page_server.add("/attack", _attack_page(proxy.url)))
    sent = _wait_for(page, ended, proxy.url, 10, "4 fetches, 3 forms and 3 embedded GETs")

    # Each reached the proxy (its own log says so) and was refused there.
    answered = _answered_by_the_proxy(proxy, log_from)
    assert answered == Counter((method, path, "403") for method, path in sent), answered
    # Nothing happened behind the refusals: no container for 'cold', no request to 'live'.
    assert [c.labels["io.inference-proxy.service"] for c in containers_of(docker_client, container_prefix)] == ["live"]
    assert _stats(live_port)["requests"] == live_before + 1  # this second /_stats call only
    # The user following a link to the proxy is no attack: it is answered.
    with page.expect_navigation() as followed:
        page.click("#link")
    assert followed.value.status == 200 and followed.value.url == f"{proxy.url}/healthz"


# -- a page whose name was rebound to 127.0.0.1 ----------------------------------------------

REBOUND_READS = """async () => {
  const out = {};
  const calls = [["GET", "/api/v1/services"], ["POST", "/api/v1/service/cold/start"], ["GET", "/healthz"],
                 ["POST", "/v1/chat/completions"], ["GET", "/service/cold/v1/models"]];
  for (const [method, path] of calls) {
    try {
      const answer = await fetch(path, method === "GET" ? {} :
          {method, headers: {"Content-Type": "application/json"}, body: CHAT});
      out[method + " " + path] = [answer.status, await answer.text()];
    } catch (error) {
      out[method + " " + path] = ["failed", String(error)];
    }
  }
  return out;
}"""


@pytest.mark.engine
def test_a_page_whose_name_is_rebound_to_the_proxy_reads_nothing_and_starts_nothing(
        engine_proxy, docker_client, container_prefix, page, page_server):
    """DNS rebinding as it happens: the page is loaded from rebind.test:<port> while that name
    and port serve the attacker's page; then the same name and port lead to the proxy, so
    the page's calls are same-origin for the browser, and it can read every answer."""
    port = page_server.port
    page.goto(page_server.add("/", "<!doctype html><html><body>attacker</body></html>").replace(
        "127.0.0.1", "rebind.test"))
    page_server.close()  # the name now leads to the proxy, on the same port
    proxy = engine_proxy({"cold": service_entry(free_port(), autostart=True, start_timeout=60)}, port=port)

    answers = page.evaluate(REBOUND_READS.replace("CHAT", json.dumps(json.dumps({**CHAT, "max_tokens": 1}))))
    for call, (status, body) in answers.items():
        assert status == 400, (call, status, body)
        error = json.loads(body)["error"]
        assert error["code"] == "host_not_allowed" and "server.allowed_hosts" in error["hint"], (call, error)
    assert containers_of(docker_client, container_prefix) == []


# -- a page of an allowed origin -----------------------------------------------------------------

KEY = "browser-key-8e1f"

ALLOWED_CALLS = """async ([proxy, key]) => {
  const out = {};
  const chat = await fetch(proxy + "/v1/chat/completions", {method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer " + key},
      body: JSON.stringify({model: "llm", max_tokens: 3, messages: [{role: "user", content: "hi"}]})});
  out.chat = [chat.status, await chat.json()];
  const echo = await fetch(proxy + "/service/llm/echo", {headers: {"X-Api-Key": key, "X-Page-Header": "1"}});
  out.echo = [echo.status, await echo.json()];
  return out;
}"""

FOREIGN_CALL = """async ([proxy, key]) => {
  try {
    const answer = await fetch(proxy + "/service/llm/echo", {headers: {"X-Api-Key": key}});
    return [answer.status, await answer.text()];
  } catch (error) {
    return ["failed", String(error)];
  }
}"""


def test_an_allowed_origin_works_through_cors_and_another_is_refused(backend, start_proxy, page, page_server):
    allowed_page = page_server.add("/app", "<!doctype html><html><body>app</body></html>")
    proxy = start_proxy({"llm": service_entry(backend.port)},
                        server_extra={"cors_origins": [page_server.origin], "api_keys": [KEY]})
    before = backend.stats()["requests"]

    page.goto(allowed_page)
    answers = page.evaluate(ALLOWED_CALLS, [proxy.url, KEY])
    # Both needed a preflight (Authorization, X-Api-Key, X-Page-Header are not "simple"): the
    # proxy answered them without a key, and the answers carried the origin, or fetch fails.
    status, chat = answers["chat"]
    assert status == 200 and chat["choices"][0]["message"]["content"] == "tok0 tok1 tok2 ", chat
    status, echo = answers["echo"]
    assert status == 200 and echo["method"] == "GET", echo
    assert ["x-page-header", "1"] in [[name.lower(), value] for name, value in echo["headers"]]
    assert backend.stats()["requests"] == before + 3  # chat, echo, this call: no preflight went on

    # The same page server under another name is another origin: refused.
    page.goto(allowed_page.replace("127.0.0.1", "localhost"))
    status, error = page.evaluate(FOREIGN_CALL, [proxy.url, KEY])
    assert status == "failed", error  # the browser saw no CORS permission
    wait_until(lambda: "403 origin_not_allowed" in proxy.log(), timeout=10, what="the refusal in the log")
    assert backend.stats()["requests"] == before + 4
