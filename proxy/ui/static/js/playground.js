// The playground: pick a model from /v1/models, send a message to /v1/chat/completions with
// stream: true, and watch the answer come token by token, with the time to the first token
// and the tokens per second. A model that is being started shows "loading" meanwhile (the
// proxy sends ": loading" comments while it waits).

import { ProxyError, apiKey, askFor, describe, getJson, request } from "./api.js";
import { events } from "./stream.js";

export class Playground {
  constructor() {
    const $ = (id) => document.getElementById(id);
    this.form = $("playground-form");
    this.model = $("playground-model");
    this.message = $("playground-message");
    this.send = $("playground-send");
    this.stopButton = $("playground-stop");
    this.keyButton = $("playground-key");
    this.status = $("playground-status");
    this.answer = $("playground-answer");
    this.ttft = $("playground-ttft");
    this.rate = $("playground-rate");
    this.tokens = $("playground-tokens");
    this.states = new Map(); // service id -> state, for the model list
    this.controller = null;
    this.onAnswered = () => {};
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.chat();
    });
    this.stopButton.addEventListener("click", () => this.controller && this.controller.abort());
    this.keyButton.addEventListener("click", async () => {
      await askFor(apiKey, { sent: false });
      this.loadModels();
    });
  }

  // The model list; without a key where one is needed, a way to give it (asked on Send too).
  async loadModels() {
    let listing;
    try {
      listing = await getJson("/v1/models", { credential: apiKey, ask: false });
    } catch (error) {
      if (error instanceof ProxyError && error.status === 401) {
        this.keyButton.hidden = false;
        this.say(`The models need an API key (server.api_keys): ${error.message}`, "models");
      } else {
        this.say(`The models could not be listed: ${describe(error)}`, "models");
      }
      return;
    }
    this.keyButton.hidden = true;
    if (this.status.dataset.kind === "models") this.say("");
    const chosen = this.model.value;
    this.model.replaceChildren();
    for (const entry of listing.data || []) {
      const option = document.createElement("option");
      option.value = entry.id;
      option.dataset.service = entry.service_id || entry.id;
      option.dataset.autostart = String(Boolean(entry.autostart));
      this.states.set(option.dataset.service, entry.state);
      this.model.append(option);
    }
    if ([...this.model.options].some((option) => option.value === chosen)) this.model.value = chosen;
    this.labelOptions();
  }

  serviceState(serviceId, state) {
    this.states.set(serviceId, state);
    this.labelOptions();
  }

  labelOptions() {
    for (const option of this.model.options) {
      const state = this.states.get(option.dataset.service);
      const via = option.value === option.dataset.service ? "" : ` → ${option.dataset.service}`;
      option.textContent = `${option.value}${via}${state ? ` (${state})` : ""}`;
    }
  }

  async chat() {
    const model = this.model.value;
    const content = this.message.value.trim();
    if (!model || !content || this.controller) return;
    const controller = new AbortController();
    this.controller = controller;
    this.running(true);
    this.answer.textContent = "";
    this.showStats(null, null, 0);
    this.say("waiting for the first token…");
    const began = performance.now();
    let first = null;
    let last = null;
    let count = 0;
    try {
      const response = await request("/v1/chat/completions", {
        credential: apiKey,
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify({ model, stream: true, messages: [{ role: "user", content }] }),
        signal: controller.signal,
      });
      if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
        // a backend that answered whole anyway
        const whole = await response.json();
        this.answer.textContent = whole.choices?.[0]?.message?.content ?? JSON.stringify(whole);
        this.say("done (the answer came whole, not streamed)");
        return;
      }
      const loading = (comment) => {
        if (first === null && comment.startsWith("loading")) this.say("loading the model…");
      };
      // Read to the end (past [DONE]): the request counts as in flight until the proxy is done.
      for await (const { data } of events(response, { onComment: loading })) {
        if (data === "[DONE]") continue;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch {
          continue;
        }
        if (chunk.error) {
          this.say(`The proxy or the model stopped with an error: ${describe(new ProxyError(0, chunk))}`);
          return;
        }
        const choice = chunk.choices && chunk.choices[0];
        const piece = choice && ((choice.delta && choice.delta.content) || choice.text);
        if (piece) {
          const now = performance.now();
          if (first === null) {
            first = now;
            this.say("streaming…");
          }
          last = now;
          count += 1;
          this.answer.append(piece);
          this.showStats(first - began, rate(count, first, last), count);
        }
        if (chunk.usage && Number.isFinite(chunk.usage.completion_tokens)) count = chunk.usage.completion_tokens;
      }
      this.showStats(first === null ? null : first - began, rate(count, first, last), count);
      this.say(first === null ? "done: the answer was empty" : "done");
    } catch (error) {
      if (controller.signal.aborted) this.say("stopped");
      else this.say(`No answer: ${describe(error)}`);
    } finally {
      this.controller = null;
      this.running(false);
      this.onAnswered(this.model.selectedOptions[0]?.dataset.service);
    }
  }

  running(yes) {
    this.send.disabled = yes;
    this.stopButton.disabled = !yes;
  }

  showStats(ttftMs, perSecond, count) {
    this.ttft.textContent = ttftMs === null ? "–" : `${Math.round(ttftMs)} ms`;
    this.rate.textContent = perSecond === null || !Number.isFinite(perSecond) ? "–" : perSecond.toFixed(1);
    this.tokens.textContent = count ? String(count) : "–";
  }

  say(text, kind = "") {
    this.status.textContent = text;
    this.status.dataset.kind = kind;
  }
}

// Tokens per second after the first (which the time to first token covers); null for one.
function rate(count, first, last) {
  return count > 1 && last > first ? (count - 1) / ((last - first) / 1000) : null;
}
