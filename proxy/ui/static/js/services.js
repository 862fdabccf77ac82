// One card per service: its state as a coloured badge, pull progress, why it failed, what
// runs, and its buttons and log panel. Everything is written with textContent: log lines and
// reasons are the containers' text, never markup.

import { describe } from "./api.js";
import * as format from "./format.js";
import { LogPanel } from "./logs.js";

const STARTABLE = new Set(["stopped", "failed"]);
const STOPPABLE = new Set(["pulling", "starting", "ready", "failed"]);

export class Services {
  // actions: start(id), confirmStop(status) -> "drain" | "now" | null, stop(id, how),
  // tail(id) -> Promise<lines>, refresh(id), stateChanged(id, state)
  constructor(list, template, emptyNote, actions) {
    this.list = list;
    this.template = template;
    this.emptyNote = emptyNote;
    this.actions = actions;
    this.cards = new Map();
  }

  // The full list (a snapshot, a reload): cards in config order, gone ones removed.
  replaceAll(reports) {
    const seen = new Set();
    for (const report of reports) {
      seen.add(report.service_id);
      const card = this.cardFor(report.service_id);
      this.list.append(card.root); // moves it into order
      card.update(report);
    }
    for (const [id, card] of this.cards) {
      if (!seen.has(id)) {
        card.remove();
        this.cards.delete(id);
      }
    }
    this.emptyNote.hidden = this.cards.size > 0;
  }

  apply(report) {
    const known = this.cards.has(report.service_id);
    const card = this.cardFor(report.service_id);
    if (!known) this.list.append(card.root);
    card.update(report);
    this.emptyNote.hidden = true;
  }

  // A `service` event: state, status, reason and progress at once; the rest follows.
  change(event) {
    const card = this.cards.get(event.service_id);
    if (!card) return false;
    card.change(event);
    return true;
  }

  get(id) {
    return this.cards.get(id);
  }

  engineUnreachable() {
    return [...this.cards.values()].some((card) => card.data.engine === "unreachable");
  }

  tick() {
    for (const card of this.cards.values()) card.tick();
  }

  cardFor(id) {
    let card = this.cards.get(id);
    if (!card) {
      card = new Card(this.template, id, this.actions);
      this.cards.set(id, card);
    }
    return card;
  }
}

class Card {
  constructor(template, id, actions) {
    this.id = id;
    this.actions = actions;
    this.root = template.content.firstElementChild.cloneNode(true);
    this.root.dataset.service = id;
    this.field = (name) => this.root.querySelector(`[data-field="${name}"]`);
    this.button = (name) => this.root.querySelector(`[data-action="${name}"]`);
    this.root.querySelector(".service-id").textContent = id;
    this.data = { service_id: id, state: "stopped" };
    this.progress = null;
    this.busy = false;
    this.idleDeadline = null; // performance.now() ms of the idle stop, as last reported
    this.idleRefreshed = false;
    this.tailFor = null; // the container whose log tail is shown
    this.logs = new LogPanel(id, this.field("logs"));
    for (const name of ["start", "stop", "logs"]) {
      this.button(name).setAttribute("aria-label", `${this.labelOf(name)} ${id}`);
    }
    this.button("start").addEventListener("click", () => this.act("start"));
    this.button("stop").addEventListener("click", () => this.act("stop"));
    this.button("logs").addEventListener("click", () => this.toggleLogs());
  }

  labelOf(name) {
    return { start: "Start", stop: "Stop", logs: "Logs of" }[name];
  }

  update(report) {
    const before = this.data.state;
    this.data = { ...this.data, ...report };
    this.progress = report.state === "pulling" ? report.progress || this.progress : null;
    const left = report.idle_seconds_left;
    this.idleDeadline = left === null || left === undefined ? null : performance.now() + left * 1000;
    this.idleRefreshed = !(left > 0);
    this.render(before);
  }

  change(event) {
    const before = this.data.state;
    const changed = { state: event.state, reason: event.reason ?? null };
    for (const name of ["status", "exit_code", "oom_killed"]) if (name in event) changed[name] = event[name];
    this.data = { ...this.data, ...changed };
    this.progress = event.state === "pulling" ? event.progress || null : null;
    this.render(before);
  }

  remove() {
    this.logs.hide();
    this.root.remove();
  }

  async act(name) {
    let how = null; // a stop's: "drain" or "now"
    if (name === "stop") {
      how = await this.actions.confirmStop(this.data);
      if (!how) return;
    }
    this.busy = true;
    this.notice("");
    this.render(this.data.state);
    try {
      await this.actions[name](this.id, how);
    } catch (error) {
      this.notice(`${name === "start" ? "Start" : "Stop"} failed: ${describe(error)}`);
    } finally {
      this.busy = false;
      this.render(this.data.state);
    }
  }

  notice(text) {
    this.field("notice").textContent = text;
  }

  toggleLogs() {
    const button = this.button("logs");
    const open = button.getAttribute("aria-expanded") !== "true";
    button.setAttribute("aria-expanded", String(open));
    if (open) this.logs.show(this.data.container_id, this.data.status === "running");
    else this.logs.hide();
  }

  render(before) {
    const d = this.data;
    const badge = this.field("state");
    badge.textContent = d.state;
    badge.dataset.state = d.state;
    badge.setAttribute("aria-label", `${this.id} is ${d.state}`);
    this.root.dataset.state = d.state;

    const aliases = d.aliases || [];
    this.field("aliases").textContent = aliases.length ? `also: ${aliases.join(", ")}` : "";

    const progressBox = this.field("progress");
    progressBox.hidden = d.state !== "pulling";
    if (d.state === "pulling") {
      const bar = progressBox.querySelector("progress");
      const percent = this.progress && Number.isFinite(this.progress.percent) ? this.progress.percent : null;
      if (percent === null) bar.removeAttribute("value");
      else bar.value = percent;
      const text = this.progress ? format.progress(this.progress) : "pulling the image";
      progressBox.querySelector(".progress-text").textContent = text;
    }

    this.renderFailure();

    this.setText("image", d.image || "–", true);
    let container = d.status && d.status !== "not found" ? d.status : "none";
    if (d.container_id) container = `${format.shortId(d.container_id)} (${d.status})`;
    if (d.stale) container += " · made from an older config: restart to apply it";
    this.setText("container", container, true);
    const group = d.group ? `${d.group}${d.exclusive ? " (exclusive)" : ""}` : "none";
    this.setText("group", group);
    this.setText("gpus", format.gpus(d.gpus));
    this.setText("load", `${d.in_flight ?? 0} / ${d.queued ?? 0}`);
    this.setText("autostart", d.autostart ? "yes" : "no");
    this.tick();

    this.button("start").disabled = this.busy || !STARTABLE.has(d.state);
    this.button("stop").disabled = this.busy || !STOPPABLE.has(d.state);
    if (before !== d.state) this.actions.stateChanged(this.id, d.state);
    this.logs.container(d.container_id, d.status === "running");
  }

  renderFailure() {
    const d = this.data;
    const box = this.field("failure");
    box.hidden = d.state !== "failed";
    if (d.state !== "failed") return;
    const parts = [`Failed (${d.reason || "no reason given"})`];
    if (format.REASONS[d.reason]) parts[0] += `: ${format.REASONS[d.reason]}`;
    if (d.exit_code !== null && d.exit_code !== undefined) parts.push(`exit code ${d.exit_code}`);
    if (d.oom_killed) parts.push("OOM-killed");
    box.querySelector(".failure-reason").textContent = parts.join(" · ");
    if (d.container_id && d.container_id !== this.tailFor) {
      this.tailFor = d.container_id;
      this.showTail();
    }
  }

  async showTail() {
    const wanted = this.tailFor;
    const pre = this.field("failure").querySelector(".log-tail");
    let tail = [];
    try {
      tail = await this.actions.tail(this.id);
    } catch (error) {
      tail = [`(the log could not be read: ${describe(error)})`];
    }
    if (this.tailFor !== wanted) return;
    pre.textContent = tail.join("\n");
    pre.hidden = tail.length === 0;
  }

  // Uptime and the idle countdown, each second, without asking the proxy.
  tick() {
    const d = this.data;
    const started = d.status === "running" ? format.dockerTime(d.started_at) : null;
    this.setText("uptime", started === null ? "–" : format.duration((Date.now() - started) / 1000));
    let idle = "never";
    if (d.idle_timeout) {
      idle = `after ${format.duration(d.idle_timeout)} idle`;
      if (this.idleDeadline !== null) {
        const left = Math.max(0, (this.idleDeadline - performance.now()) / 1000);
        idle = `in ${format.duration(left)} (${idle})`;
        if (left === 0 && !this.idleRefreshed) {
          this.idleRefreshed = true; // a request may have come meanwhile: ask once
          this.actions.refresh(this.id);
        }
      }
    }
    this.setText("idle", idle);
  }

  setText(name, text, mono = false) {
    const element = this.field(name);
    if (element.textContent !== text) element.textContent = text;
    element.classList.toggle("mono", mono);
  }
}
