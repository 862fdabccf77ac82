// The live feed: GET /api/v1/events, followed with fetch (so the admin token goes in a
// header), and connected again with a growing pause whenever it ends: the proxy restarted,
// the network went away, or nothing (not even a keep-alive) came for too long.

import { request } from "./api.js";
import { events } from "./stream.js";

const FIRST_PAUSE = 500; // ms before the first reconnect; doubled each failure
const LONGEST_PAUSE = 8000;
const SILENCE = 40000; // ms without a byte (keep-alives come every 15 s) before reconnecting

export class Feed {
  // handlers: snapshot(services), service(change), reload(data), state(word): connecting,
  // reconnecting or live
  constructor(handlers) {
    this.handlers = handlers;
    this.running = false;
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.loop();
  }

  async loop() {
    let pause = FIRST_PAUSE;
    let first = true;
    while (this.running) {
      this.handlers.state(first ? "connecting" : "reconnecting");
      try {
        await this.follow(() => {
          pause = FIRST_PAUSE; // it got through: the next drop reconnects quickly
        });
      } catch {
        // the proxy went away or refused: try again after the pause
      }
      first = false;
      this.handlers.state("reconnecting");
      await sleep(pause + Math.random() * 250);
      pause = Math.min(pause * 2, LONGEST_PAUSE);
    }
  }

  async follow(connected) {
    const controller = new AbortController();
    let watchdog = 0;
    const heard = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => controller.abort(), SILENCE);
    };
    try {
      heard();
      const response = await request("/api/v1/events", {
        headers: { Accept: "text/event-stream" },
        signal: controller.signal,
      });
      connected();
      this.handlers.state("live");
      for await (const message of events(response, { onBytes: heard })) {
        this.dispatch(message);
      }
    } finally {
      clearTimeout(watchdog);
      controller.abort(); // let go of the connection whichever way this ended
    }
  }

  dispatch({ event, data }) {
    let payload;
    try {
      payload = JSON.parse(data);
    } catch {
      return; // not JSON: nothing this page knows of
    }
    const handler = { snapshot: "snapshot", service: "service", reload: "reload" }[event];
    if (!handler) return;
    try {
      this.handlers[handler](handler === "snapshot" ? payload.services || [] : payload);
    } catch (error) {
      console.error("status page: the", event, "event was not shown:", error); // a bug: make it seen
    }
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
