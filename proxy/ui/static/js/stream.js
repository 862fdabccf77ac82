// Reading streamed answers with fetch: text lines as they come, and Server-Sent Events on
// top of them. (EventSource cannot send an Authorization header; fetch can.)

// Yield each line of the body as it arrives (without its line end). onBytes is told of
// every piece received, comments and keep-alives included.
export async function* lines(response, onBytes = () => {}) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let rest = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      onBytes();
      rest += value;
      const parts = rest.split(/\r\n|\r(?!$)|\n/);
      rest = parts.pop();
      for (const line of parts) yield line;
    }
    if (rest) yield rest.replace(/\r$/, "");
  } finally {
    reader.releaseLock();
  }
}

// Yield each event of a text/event-stream body as {event, data} (data lines joined by
// "\n"); comment lines (": loading", ": keep-alive") go to onComment.
export async function* events(response, { onComment = () => {}, onBytes } = {}) {
  let event = "";
  let data = [];
  for await (const line of lines(response, onBytes)) {
    if (line === "") {
      if (data.length) yield { event: event || "message", data: data.join("\n") };
      event = "";
      data = [];
      continue;
    }
    if (line.startsWith(":")) {
      onComment(line.slice(1).trim());
      continue;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
}
