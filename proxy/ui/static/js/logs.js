// A service's log panel: follows GET /api/v1/service/<id>/logs?follow=true with fetch, keeps
// at most MAX_LINES lines, and can be paused (lines keep coming in; the view holds still).

import { ProxyError, request } from "./api.js";
import { lines } from "./stream.js";

export const MAX_LINES = 5000;
const TAIL = 200; // lines of the past shown when the panel opens

export class LogPanel {
  constructor(serviceId, section) {
    this.serviceId = serviceId;
    this.section = section;
    this.view = section.querySelector(".log-lines");
    this.stateText = section.querySelector(".logs-state");
    this.pauseButton = section.querySelector('[data-action="pause"]');
    this.view.setAttribute("aria-label", `Log of ${serviceId}`);
    this.lines = [];
    this.unseen = 0; // lines that came in while paused
    this.paused = false;
    this.open = false;
    this.controller = null; // the stream being read
    this.following = null; // its container id
    this.ended = false; // its stream came to its end (the container stopped)
    this.drawScheduled = false;
    this.pauseButton.addEventListener("click", () => this.setPaused(!this.paused));
  }

  show(containerId, running) {
    this.open = true;
    this.section.hidden = false;
    this.container(containerId, running);
  }

  hide() {
    this.open = false;
    this.section.hidden = true;
    this.stop();
  }

  // The card tells of its container: a new one is followed; one whose stream broke off (the
  // proxy restarted, say) is followed again while it runs. A stream that ended cleanly
  // ended with its container.
  container(containerId, running) {
    if (!this.open) return;
    if (!containerId) {
      if (this.following === null) this.say("no container: nothing to show yet");
      return; // else the last one's lines stay, and how its stream ended
    }
    const broken = !this.controller && !this.ended && running;
    if (containerId !== this.following || broken) this.follow(containerId);
  }

  stop() {
    if (this.controller) this.controller.abort();
    this.controller = null;
  }

  async follow(containerId) {
    this.stop();
    const controller = new AbortController();
    this.controller = controller;
    if (containerId === this.following) this.lines = []; // its tail comes again
    else if (this.following !== null) this.add([`--- container ${containerId.slice(0, 12)} ---`]);
    this.following = containerId;
    this.ended = false;
    this.say("following");
    const path = `/api/v1/service/${encodeURIComponent(this.serviceId)}/logs?tail=${TAIL}&follow=true`;
    try {
      const response = await request(path, { signal: controller.signal });
      await this.consume(response);
      if (this.controller === controller) {
        this.ended = true;
        this.say("ended: the container stopped");
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      if (error instanceof ProxyError && error.code === "no_container") this.say("no container: nothing to show");
      else this.say(`stopped following: ${error.message}`);
    } finally {
      if (this.controller === controller) this.controller = null;
    }
  }

  // Read a text/plain body line by line into the panel.
  async consume(response) {
    let batch = [];
    let flush = 0;
    for await (const line of lines(response)) {
      batch.push(line);
      if (!flush) {
        // many lines come at once (the tail): take them in one go
        flush = setTimeout(() => {
          this.add(batch);
          batch = [];
          flush = 0;
        }, 50);
      }
    }
    clearTimeout(flush);
    this.add(batch);
  }

  add(newLines) {
    if (!newLines.length) return;
    this.lines.push(...newLines);
    if (this.lines.length > MAX_LINES) this.lines.splice(0, this.lines.length - MAX_LINES);
    if (this.paused) {
      this.unseen = Math.min(this.unseen + newLines.length, MAX_LINES);
      this.say(`paused · ${this.unseen} new line${this.unseen === 1 ? "" : "s"}`);
      return;
    }
    this.scheduleDraw();
  }

  setPaused(paused) {
    this.paused = paused;
    this.pauseButton.setAttribute("aria-pressed", String(paused));
    this.pauseButton.textContent = paused ? "Resume" : "Pause";
    if (paused) {
      this.say("paused");
    } else {
      this.unseen = 0;
      this.say(this.controller ? "following" : "");
      this.scheduleDraw();
    }
  }

  scheduleDraw() {
    if (this.drawScheduled) return;
    this.drawScheduled = true;
    requestAnimationFrame(() => {
      this.drawScheduled = false;
      const view = this.view;
      const atBottom = view.scrollHeight - view.scrollTop - view.clientHeight < 24;
      view.textContent = this.lines.join("\n");
      if (atBottom) view.scrollTop = view.scrollHeight;
    });
  }

  say(text) {
    this.stateText.textContent = text;
  }
}
