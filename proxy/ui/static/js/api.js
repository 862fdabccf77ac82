// Calls to this proxy (same origin only), with the credential each route needs.
//
// A credential (the admin token, an API key) is asked for when the proxy answers 401, kept
// in sessionStorage only (this tab, until it is closed) and sent as "Authorization: Bearer";
// never in a URL.

export class Credential {
  constructor(name, storageKey) {
    this.name = name;
    this.storageKey = storageKey;
    this.pending = null; // the prompt under way, shared by every call that met a 401
  }

  get value() {
    return sessionStorage.getItem(this.storageKey);
  }

  set value(text) {
    if (text) sessionStorage.setItem(this.storageKey, text);
    else sessionStorage.removeItem(this.storageKey);
  }

  headers() {
    const value = this.value;
    return value ? { Authorization: `Bearer ${value}` } : {};
  }
}

export const adminToken = new Credential("admin token", "inference-proxy.admin-token");
export const apiKey = new Credential("API key", "inference-proxy.api-key");

// The proxy's error envelope as an exception: status, code and message.
export class ProxyError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.detail = error;
  }
}

// An error in a line: "401 unauthorized: Invalid admin token".
export function describe(error) {
  if (error && error.status) return `${error.status} ${error.code || ""}: ${error.message}`.replace(" :", ":");
  return error && error.message ? error.message : String(error);
}

// Asking the user for a credential is the page's (dialogs.js); set by main.js.
let askUser = async () => {
  throw new Error("no way to ask for a credential");
};

export function setCredentialPrompt(prompt) {
  askUser = prompt;
}

// Ask once however many calls met the 401; resolves when the user gave a new value.
export function askFor(credential, refusal) {
  if (!credential.pending) {
    credential.pending = askUser(credential, refusal).finally(() => {
      credential.pending = null;
    });
  }
  return credential.pending;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null; // not the envelope (a front proxy's page): the status says enough
  }
  return new ProxyError(response.status, body);
}

// fetch() with the credential, asking for it again on 401 (with ask: false, a 401 is thrown
// like any error); answers an ok Response, or throws ProxyError. The caller reads (or
// streams) the body.
export async function request(path, options = {}) {
  const { credential = adminToken, method = "GET", body, headers = {}, signal, ask = true } = options;
  for (;;) {
    const sent = credential.value;
    const response = await fetch(path, {
      method,
      body,
      signal,
      cache: "no-store",
      credentials: "same-origin",
      headers: { ...headers, ...credential.headers() },
    });
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status !== 401 || !ask) throw error;
    // Another call may have got a better value meanwhile: use it before asking.
    if (credential.value === sent) await askFor(credential, { error, sent: sent !== null });
  }
}

export async function getJson(path, options) {
  const response = await request(path, options);
  return response.json();
}

export async function postJson(path, options = {}) {
  const response = await request(path, { ...options, method: "POST" });
  return response.json();
}
