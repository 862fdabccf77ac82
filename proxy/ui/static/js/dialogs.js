// The page's two questions: a credential the proxy asked for (401), and how to stop a
// service. Both are <dialog>s: focus moves in, Escape cancels, focus returns after.

import { adminToken, describe } from "./api.js";

const EXPLAIN = {
  [adminToken.storageKey]:
    "This proxy asks for its admin token (server.admin_token). It is kept in this tab only and sent as " +
    "'Authorization: Bearer'.",
};
const EXPLAIN_KEY =
  "This proxy asks for an API key (server.api_keys) to reach its models. It is kept in this tab only and sent " +
  "as 'Authorization: Bearer'.";

let queue = Promise.resolve(); // one dialog at a time

// Ask for a credential; resolves once the user gave one. A cancel leaves it pending and
// shows `onCancel`'s way back (a banner with a button that asks again).
export function promptCredential(credential, refusal, onCancel) {
  return new Promise((resolve) => {
    const open = () => {
      const shown = queue.then(() => ask(credential, refusal));
      queue = shown;
      shown.then((given) => (given ? resolve() : onCancel(credential, open)));
    };
    open();
  });
}

// Show the dialog; true once a value was given, false when cancelled.
function ask(credential, refusal) {
  const dialog = document.getElementById("credential-dialog");
  const form = document.getElementById("credential-form");
  const input = document.getElementById("credential-input");
  const error = document.getElementById("credential-error");
  const cancelButton = document.getElementById("credential-cancel");
  const title = credential === adminToken ? "Admin token" : "API key";
  document.getElementById("credential-title").textContent = title;
  document.getElementById("credential-label").textContent = title;
  document.getElementById("credential-explain").textContent = EXPLAIN[credential.storageKey] || EXPLAIN_KEY;
  error.hidden = !refusal.sent;
  error.textContent = refusal.sent
    ? `The proxy refused this ${credential.name} (${describe(refusal.error)}). Check it and try again.`
    : "";
  input.value = "";

  return new Promise((resolve) => {
    const finish = (given) => {
      form.removeEventListener("submit", submitted);
      dialog.removeEventListener("cancel", escaped);
      cancelButton.removeEventListener("click", cancelled);
      dialog.close();
      resolve(given);
    };
    const submitted = (event) => {
      event.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      credential.value = value;
      finish(true);
    };
    const cancelled = () => finish(false);
    const escaped = (event) => {
      event.preventDefault();
      finish(false);
    };
    form.addEventListener("submit", submitted);
    dialog.addEventListener("cancel", escaped);
    cancelButton.addEventListener("click", cancelled);
    dialog.showModal();
    input.focus();
  });
}

// "drain", "now", or null (cancelled).
export function confirmStop(service) {
  const dialog = document.getElementById("stop-dialog");
  const form = document.getElementById("stop-form");
  document.getElementById("stop-title").textContent = `Stop ${service.service_id}?`;
  const inFlight = service.in_flight || 0;
  document.getElementById("stop-explain").textContent =
    `Drain lets the ${inFlight} request${inFlight === 1 ? "" : "s"} in flight finish first (up to its ` +
    "drain_timeout) while new ones wait; stop now cuts them.";
  return new Promise((resolve) => {
    const submitted = (event) => {
      event.preventDefault();
      finish(event.submitter ? event.submitter.value : "cancel");
    };
    const escaped = (event) => {
      event.preventDefault();
      finish("cancel");
    };
    const finish = (choice) => {
      form.removeEventListener("submit", submitted);
      dialog.removeEventListener("cancel", escaped);
      dialog.close();
      resolve(choice === "drain" || choice === "now" ? choice : null);
    };
    form.addEventListener("submit", submitted);
    dialog.addEventListener("cancel", escaped);
    dialog.showModal();
    document.getElementById("stop-drain").focus();
  });
}
