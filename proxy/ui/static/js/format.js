// Words and numbers as the page shows them.

// "1h 02m", "3m 05s", "42s"
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const total = Math.max(0, Math.round(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
  return `${s}s`;
}

// Docker's RFC 3339 time (nanoseconds, "Z") as epoch milliseconds; null for none or its zero time.
export function dockerTime(text) {
  if (!text) return null;
  const trimmed = text.replace(/(\.\d{3})\d+/, "$1"); // Date.parse wants at most milliseconds
  const ms = Date.parse(trimmed);
  return Number.isFinite(ms) && ms > 0 ? ms : null;
}

export function shortId(id) {
  return id ? id.slice(0, 12) : "–";
}

export function gpus(value) {
  if (value === null || value === undefined) return "none";
  if (value === "all") return "all";
  if (Array.isArray(value)) return `devices ${value.join(", ")}`;
  return `${value}`;
}

export function bytes(count) {
  if (!Number.isFinite(count)) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit && value < 10 ? 1 : 0)} ${units[unit]}`;
}

// Pull progress as one line: "layers 3/7 · 120 MB of 800 MB · 15%"
export function progress(p) {
  const parts = [];
  if (Number.isFinite(p.layers_total)) parts.push(`layers ${p.layers_done ?? 0}/${p.layers_total}`);
  if (Number.isFinite(p.bytes_total) && p.bytes_total > 0) {
    parts.push(`${bytes(p.bytes_done ?? 0)} of ${bytes(p.bytes_total)}`);
  }
  if (Number.isFinite(p.percent)) parts.push(`${Math.floor(p.percent)}%`);
  return parts.join(" · ") || "pulling";
}

export const REASONS = {
  start_failed: "Docker refused to start it",
  image_unavailable: "its image is missing and could not be pulled",
  volume_missing: "a volume's host path does not exist",
  container_exited: "the container exited by itself",
  oom_killed: "the container ran out of memory",
  start_timeout: "it was not ready within its start_timeout",
};
