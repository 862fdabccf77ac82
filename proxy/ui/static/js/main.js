// The status page: wires the live feed, the service cards, the dialogs and the playground.
//
// What is shown comes from the feed (GET /api/v1/events): a snapshot on connect, then one
// event per change, after which that one service's full status is fetched once
// (GET /api/v1/container/<id>). No polling.

import { describe, getJson, postJson, request, setCredentialPrompt } from "./api.js";
import { confirmStop, promptCredential } from "./dialogs.js";
import { Feed } from "./feed.js";
import { Playground } from "./playground.js";
import { Services } from "./services.js";

const $ = (id) => document.getElementById(id);
const LIVE_WORDS = { connecting: "connecting…", reconnecting: "reconnecting…", live: "live" };

// Events seen per service: an answer asked for before the latest event is older than it.
const seen = new Map();
const mark = (id) => seen.get(id) || 0;
const bump = (id) => seen.set(id, mark(id) + 1);

function banner(text, action = null) {
  $("banner").hidden = !text;
  $("banner-text").textContent = text || "";
  const button = $("banner-action");
  button.hidden = !action;
  if (action) {
    button.textContent = action.label;
    button.onclick = action.run;
  }
}

setCredentialPrompt((credential, refusal) =>
  promptCredential(credential, refusal, (cancelled, reopen) =>
    banner(`The page needs the ${cancelled.name} to go on.`, {
      label: `Enter the ${cancelled.name}`,
      run: () => {
        banner("");
        reopen();
      },
    }),
  ).then(() => banner("")),
);

const playground = new Playground();
// A request resets the idle countdown and the counts: show them afresh, once the proxy has
// counted the request out (just after the answer's last byte).
const AFTER_ANSWER = 300; // ms
playground.onAnswered = (serviceId) => {
  if (serviceId && services.get(serviceId)) setTimeout(() => refresh(serviceId), AFTER_ANSWER);
};

const services = new Services($("services"), $("service-template"), $("services-empty"), {
  async start(id) {
    const asked = mark(id);
    const answer = await postJson(`/api/v1/service/${encodeURIComponent(id)}/start`);
    if (mark(id) === asked) services.apply(answer);
  },
  confirmStop,
  async stop(id, how) {
    const asked = mark(id);
    const answer = await postJson(`/api/v1/service/${encodeURIComponent(id)}/stop?drain=${how === "drain"}`);
    if (mark(id) === asked) services.apply(answer);
  },
  async tail(id) {
    const response = await request(`/api/v1/service/${encodeURIComponent(id)}/logs?tail=30`);
    const text = await response.text();
    return text.split("\n").filter((line, index, all) => line || index < all.length - 1);
  },
  refresh,
  stateChanged(id, state) {
    playground.serviceState(id, state);
  },
});

async function refresh(id) {
  const asked = mark(id);
  try {
    const report = await getJson(`/api/v1/container/${encodeURIComponent(id)}`);
    if (mark(id) === asked) services.apply(report);
    showEngine();
  } catch (error) {
    services.get(id)?.notice(`Its status could not be read: ${describe(error)}`);
  }
}

async function refreshAll() {
  try {
    const listing = await getJson("/api/v1/services");
    for (const report of listing.services) bump(report.service_id);
    services.replaceAll(listing.services);
    showEngine();
  } catch (error) {
    banner(`The services could not be read: ${describe(error)}`);
  }
}

function showEngine() {
  const engine = $("engine");
  engine.hidden = !services.engineUnreachable();
  engine.textContent = "Docker engine unreachable: the last known state is shown";
}

const feed = new Feed({
  state(word) {
    const connection = $("connection");
    connection.dataset.live = word;
    connection.textContent = LIVE_WORDS[word];
  },
  snapshot(reports) {
    // On every (re)connect: the proxy may have restarted with another config meanwhile.
    for (const id of seen.keys()) bump(id);
    services.replaceAll(reports);
    showEngine();
    playground.loadModels();
  },
  service(change) {
    bump(change.service_id);
    if (services.change(change)) refresh(change.service_id);
    else refreshAll(); // a service this page has not seen yet
  },
  reload() {
    refreshAll();
    playground.loadModels();
  },
});

setInterval(() => services.tick(), 1000);
feed.start();
