"""Turn raw load results into figures, check them against the benchmark's targets, and print
the table (every figure next to its difference or ratio to direct) and the JSON."""
from __future__ import annotations

import os
import platform
import subprocess
import time

from targets import cpu_seconds

MB = 1e6
# alt: a second proxy checkout (--compare-root); with --floor, stack: the least forwarder the
# fixed stack allows (Flask, requests, gunicorn-gevent), and relay: a bare gevent byte relay
NAMES = ("direct", "nginx", "proxy", "alt", "stack", "relay")


def cpu_of(pids: list[int]) -> float:
    return cpu_seconds(pids)


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _per(total: float | None, count: int, scale: float = 1e6) -> float | None:
    return None if total is None or not count else total / count * scale


def idle(targets) -> dict:
    """Worker RSS after warm-up, and the CPU the stacks burn doing nothing (2 s)."""
    before = {t.name: t.cpu() for t in targets if t.proc is not None}
    time.sleep(2.0)
    out = {}
    for t in targets:
        if t.proc is None:
            continue
        out[t.name] = {"rss_mb": t.worker_rss() / MB, "private_mb": t.worker_private() / MB,
                       "idle_cpu_ms_per_s": (t.cpu() - before[t.name]) / 2 * 1000,
                       "worker_pid": t.worker_pid()}
    return out


def _client(runs: list[dict]) -> dict:
    cpu = sum(r["client_cpu_s"] for r in runs)
    wall = sum(r["client_wall_s"] for r in runs)
    return {"client_cpu_share": cpu / wall if wall else None}


def requests_served(run: dict) -> int:
    """Every request the target answered inside a load's CPU window: the timed ones, the
    failed ones and the untimed warm-up request of each connection."""
    return run["completed"] + run["errors"] + run["warm_ups"]


def summarise_chat(runs: dict) -> dict:
    out = {}
    for name, rounds in runs.items():
        c1 = [r["c1"] for r in rounds]
        c32 = [r["c32"] for r in rounds]
        latencies = [x for r in c1 for x in r["latencies_ms"]]
        served_c1 = sum(requests_served(r) for r in c1)
        served_c32 = sum(requests_served(r) for r in c32)
        cpu_c1 = None if c1[0]["cpu_s"] is None else sum(r["cpu_s"] for r in c1)
        cpu_c32 = None if c32[0]["cpu_s"] is None else sum(r["cpu_s"] for r in c32)
        out[name] = {
            "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99),
            "p50_ms_by_round": [pct(r["latencies_ms"], 50) for r in c1],
            "rps_c32": sum(r["completed"] for r in c32) / sum(r["elapsed_s"] for r in c32),
            "rps_c32_by_round": [r["completed"] / r["elapsed_s"] for r in c32],
            "cpu_us_per_request_c1": _per(cpu_c1, served_c1),
            "cpu_us_per_request_c32": _per(cpu_c32, served_c32),
            "backend_cpu_us_per_request_c32": _per(sum(r["backend_cpu_s"] for r in c32), served_c32),
            "requests": served_c1 + served_c32,
            "errors": sum(r["errors"] for r in c1 + c32),
            "error_samples": [e for r in c1 + c32 for e in r["error_samples"]][:5],
            "client_c32": _client(c32),
        }
    return out


def summarise_streams(runs: dict) -> dict:
    out = {}
    for name, rounds in runs.items():
        ttfb = [x for r in rounds for x in r["ttfb_ms"]]
        first_event = [x for r in rounds for x in r["first_event_ms"]]
        transit = [x for r in rounds for x in r["transit_ms"]]
        gaps = [x for r in rounds for x in r["gaps_ms"]]
        events = sum(r["events"] for r in rounds)
        cpu = None if rounds[0]["cpu_s"] is None else sum(r["cpu_s"] for r in rounds)
        peaks = [r["rss_peak"] for r in rounds if r["rss_peak"] is not None]
        private = [r["private_peak"] for r in rounds if r.get("private_peak") is not None]
        out[name] = {
            "ttfb_p50_ms": pct(ttfb, 50), "ttfb_p99_ms": pct(ttfb, 99),
            "ttfb_p50_ms_by_round": [pct(r["ttfb_ms"], 50) for r in rounds],
            "first_event_p50_ms": pct(first_event, 50), "first_event_p99_ms": pct(first_event, 99),
            "transit_p50_ms": pct(transit, 50), "transit_p99_ms": pct(transit, 99),
            "gap_p50_ms": pct(gaps, 50), "gap_p99_ms": pct(gaps, 99),
            "gap_p99_ms_by_round": [pct(r["gaps_ms"], 99) for r in rounds],
            "streams": sum(r["streams"] for r in rounds), "chunks": events,
            "errors": sum(r["errors"] for r in rounds), "incomplete": sum(r["incomplete"] for r in rounds),
            "error_samples": [e for r in rounds for e in r["error_samples"]][:5],
            "cpu_us_per_chunk": _per(cpu, events),
            "cpu_s": cpu,
            "rss_peak_mb": max(peaks) / MB if peaks else None,
            "private_peak_mb": max(private) / MB if private else None,
            "elapsed_s": sum(r["elapsed_s"] for r in rounds),
            **_client(rounds),
        }
    return out


def summarise_transfer(runs: dict, baseline: dict, total: int) -> dict:
    out = {}
    for name, rounds in runs.items():
        up = [r["upload"] for r in rounds]
        down = [r["download"] for r in rounds]
        has_worker = up[0]["rss_peak"] is not None
        out[name] = {
            "bytes": total,
            "upload_mb_s": sum(r["bytes"] for r in up) / sum(r["elapsed_s"] for r in up) / MB,
            "download_mb_s": sum(r["bytes"] for r in down) / sum(r["elapsed_s"] for r in down) / MB,
            # growth over the worker's RSS before the first transfer of the run
            "upload_rss_growth_mb": max(r["rss_peak"] for r in up) / MB - baseline[name] / MB if has_worker else None,
            "download_rss_growth_mb": max(r["rss_peak"] for r in down) / MB - baseline[name] / MB if has_worker else None,
            "cpu_ms_per_100mb_upload": _per(sum(r["cpu_s"] for r in up), len(up) * total / 1e8, 1e3) if has_worker else None,
            "cpu_ms_per_100mb_download": _per(sum(r["cpu_s"] for r in down), len(down) * total / 1e8, 1e3) if has_worker else None,
            "errors": sum(r["errors"] for r in up + down),
        }
    return out


# ---------------------------------------------------------------- targets


def _get(metrics: dict, path: str):
    value = metrics
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def check_targets(m: dict, name: str = "proxy") -> list[dict]:
    """The benchmark's targets, for the proxy (or, for comparison, another column such as the
    stack floor); met is None when the figure was not measured."""
    out = []

    def add(label: str, limit: str, value, met):
        out.append({"target": label, "limit": limit, "value": value, "met": None if value is None else bool(met)})

    cpu_req = _get(m, f"chat.{name}.cpu_us_per_request_c32")
    add("proxy CPU per request (c=32)", "<= 400 us", cpu_req, cpu_req is not None and cpu_req <= 400)
    cpu_chunk = _get(m, f"streaming.{name}.cpu_us_per_chunk")
    add("proxy CPU per streamed chunk", "<= 25 us", cpu_chunk, cpu_chunk is not None and cpu_chunk <= 25)
    p50, d50 = _get(m, f"chat.{name}.p50_ms"), _get(m, "chat.direct.p50_ms")
    added = None if p50 is None or d50 is None else p50 - d50
    add("added latency p50 at c=1", "<= 0.5 ms", added, added is not None and added <= 0.5)
    t200, d200 = _get(m, f"streams200.{name}.ttfb_p50_ms"), _get(m, "streams200.direct.ttfb_p50_ms")
    ratio = None if t200 is None or not d200 else t200 / d200
    add("200 streams: TTFB p50 vs direct", "<= 2x", ratio, ratio is not None and ratio <= 2)
    bad200 = None if _get(m, f"streams200.{name}") is None else m["streams200"][name]["errors"] + m["streams200"][name]["incomplete"]
    add("200 streams: errors + incomplete", "0", bad200, bad200 == 0)
    bad = None if _get(m, f"streams1000.{name}") is None else m["streams1000"][name]["errors"] + m["streams1000"][name]["incomplete"]
    add("1,000 streams: errors + incomplete", "0", bad, bad == 0)
    g, dg = _get(m, f"streams1000.{name}.gap_p99_ms"), _get(m, "streams1000.direct.gap_p99_ms")
    added_gap = None if g is None or dg is None else g - dg
    add("1,000 streams: added inter-chunk gap p99", "<= 10 ms", added_gap, added_gap is not None and added_gap <= 10)
    rss = _get(m, f"streams1000.{name}.rss_peak_mb")
    add("worker RSS under 1,000 streams", "<= 80 MB", rss, rss is not None and rss <= 80)
    growth = [_get(m, f"transfer.{name}.{k}_rss_growth_mb") for k in ("upload", "download")]
    worst = None if None in growth else max(growth)
    add("100 MB up/down in constant memory (worker RSS growth)", "<= 10 MB", worst, worst is not None and worst <= 10)
    if name != "proxy":
        return out  # the container targets are the proxy's API alone
    api, cli = _get(m, "containers.api_start_s.median"), _get(m, "containers.cli_run_s.median")
    ratio = None if api is None or not cli else api / cli
    add("start API vs docker run -d (median)", "<= 1.2x", ratio, ratio is not None and ratio <= 1.2)
    stop, timeout = _get(m, "containers.api_stop_s.max"), _get(m, "containers.stop_timeout_s")
    add("stop API (slowest) within stop timeout + 1 s", f"<= {timeout + 1:g} s" if timeout is not None else "-",
        stop, stop is not None and stop <= timeout + 1)
    stop, timeout = _get(m, "containers.stubborn_stop_s.max"), _get(m, "containers.stubborn_stop_timeout_s")
    add("stop API, SIGTERM ignored (slowest), within stop timeout + 1 s",
        f"<= {timeout + 1:g} s" if timeout is not None else "-", stop, stop is not None and stop <= timeout + 1)
    return out


# ---------------------------------------------------------------- document and table


def machine() -> dict:
    memory = None
    try:
        memory = int(open("/proc/meminfo").read().split()[1]) / 1e6  # kB -> GB
    except (OSError, IndexError, ValueError):
        pass
    try:
        nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=5).stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        nginx = None
    return {"cores": os.cpu_count(), "memory_gb": round(memory, 1) if memory else None,
            "kernel": platform.release(), "python": platform.python_version(), "nginx": nginx,
            "load_average_at_end": os.getloadavg()}


def _marginal_chunk_cost(metrics: dict) -> None:
    """CPU per chunk less each stream's share of per-request work (the c=1 request cost):
    what one more chunk costs, apart from setting the stream up."""
    streaming, chat = metrics.get("streaming", {}), metrics.get("chat", {})
    for name, figures in streaming.items():
        per_request = chat.get(name, {}).get("cpu_us_per_request_c1")
        if per_request is not None and figures["cpu_s"] is not None and figures["chunks"]:
            figures["cpu_us_per_chunk_marginal"] = (
                (figures["cpu_s"] * 1e6 - figures["streams"] * per_request) / figures["chunks"])


def document(results: dict) -> dict:
    metrics = {key: results[key] for key in ("idle", "transfer", "chat", "streaming", "streams200", "streams1000",
                                             "containers") if key in results}
    _marginal_chunk_cost(metrics)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(), "settings": results["settings"],
            "phases": results["phases"], "proxy_root": results["proxy_root"], "compare_root": results.get("compare_root"), "elapsed_s": results.get("elapsed_s"),
            "metrics": metrics, "targets": check_targets(metrics),
            "stack_floor_targets": check_targets(metrics, "stack") if _get(metrics, "chat.stack") is not None else None}


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _cell(value, direct, digits: int, compare: str | None, is_direct: bool) -> str:
    text = _num(value, digits)
    if value is None or direct is None or is_direct or compare is None:
        return text
    if compare == "diff":
        return f"{text} ({value - direct:+,.{digits}f})"
    return f"{text} (x{value / direct:.2f})" if direct else text


# (label, metric path under the section, digits, comparison with direct, target text)
SECTIONS = [
    ("chat", "Non-streaming chat completion (16 tokens)", [
        ("latency p50, c=1 (ms)", "p50_ms", 2, "diff", "+<=0.5 ms"),
        ("latency p99, c=1 (ms)", "p99_ms", 2, "diff", ""),
        ("throughput, c=32 (req/s)", "rps_c32", 0, "ratio", ""),
        ("CPU per request, c=1 (us)", "cpu_us_per_request_c1", 0, None, ""),
        ("CPU per request, c=32 (us)", "cpu_us_per_request_c32", 0, None, "<=400 us"),
    ]),
    ("streaming", "Streaming (64 chunks, 20 ms apart, 8 streams at a time)", [
        ("time to first byte p50 (ms)", "ttfb_p50_ms", 2, "diff", ""),
        ("time to first byte p99 (ms)", "ttfb_p99_ms", 2, "diff", ""),
        ("time to first event p50 (ms)", "first_event_p50_ms", 2, "diff", ""),
        ("per-chunk transit p50 (ms)", "transit_p50_ms", 2, "diff", ""),
        ("per-chunk transit p99 (ms)", "transit_p99_ms", 2, "diff", ""),
        ("CPU per chunk (us)", "cpu_us_per_chunk", 1, None, "<=25 us"),
        ("  less the stream's request cost (us)", "cpu_us_per_chunk_marginal", 1, None, ""),
    ]),
    ("streams200", "200 concurrent streams ({s200_tokens} chunks, {s200_ms:g} ms apart)", [
        ("time to first byte p50 (ms)", "ttfb_p50_ms", 1, "ratio", "<=2x direct"),
        ("time to first byte p99 (ms)", "ttfb_p99_ms", 1, "ratio", ""),
        ("inter-chunk gap p99 (ms)", "gap_p99_ms", 1, "diff", ""),
        ("errors", "errors", 0, None, "0"),
        ("incomplete streams", "incomplete", 0, None, "0"),
    ]),
    ("streams1000", "1,000 concurrent streams ({s1000_tokens} chunks, {s1000_ms:g} ms apart)", [
        ("time to first byte p50 (ms)", "ttfb_p50_ms", 1, "ratio", ""),
        ("time to first byte p99 (ms)", "ttfb_p99_ms", 1, "ratio", ""),
        ("inter-chunk gap p99 (ms)", "gap_p99_ms", 1, "diff", "+<=10 ms"),
        ("errors", "errors", 0, None, "0"),
        ("incomplete streams", "incomplete", 0, None, "0"),
        ("worker RSS, peak (MB)", "rss_peak_mb", 1, None, "<=80 MB"),
        ("  of it private to the worker (MB)", "private_peak_mb", 1, None, ""),
    ]),
    ("transfer", "100 MB upload and download", [
        ("upload (MB/s)", "upload_mb_s", 0, "ratio", ""),
        ("download (MB/s)", "download_mb_s", 0, "ratio", ""),
        ("worker RSS growth, upload (MB)", "upload_rss_growth_mb", 1, None, "<=10 MB"),
        ("worker RSS growth, download (MB)", "download_rss_growth_mb", 1, None, "<=10 MB"),
    ]),
    ("idle", "Memory", [
        ("worker RSS, idle after warm-up (MB)", "rss_mb", 1, None, ""),
        ("  of it private to the worker (MB)", "private_mb", 1, None, ""),
    ]),
]


def _figure(value) -> str:
    return "-" if value is None else f"{value:,.3g}" if isinstance(value, float) else str(value)


def _line(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()


def table(doc: dict) -> str:
    m = doc["metrics"]
    names = [n for n in NAMES if any(n in section for section in m.values() if isinstance(section, dict))]
    rows: list[list[str]] = [["", *names, "target (proxy)"]] if names else []
    s = doc["settings"]  # --quick streams fewer chunks
    titles = {**s, "s200_ms": s["s200_delay"] * 1000, "s1000_ms": s["s1000_delay"] * 1000}
    for key, title, lines in SECTIONS:
        if key not in m:
            continue
        rows.append([f"# {title.format(**titles)}"])
        for label, metric, digits, compare, target in lines:
            direct = _get(m, f"{key}.direct.{metric}")
            rows.append([label] + [_cell(_get(m, f"{key}.{name}.{metric}"), direct, digits, compare, name == "direct")
                                   for name in names] + [target])
    text = []
    if rows:
        widths = [max(len(r[i]) for r in rows if len(r) > 1 and i < len(r)) for i in range(len(names) + 2)]
        text = [_line(rows[0], widths), _line(["-" * w for w in widths], widths)]
        for row in rows[1:]:
            text.append(row[0] if len(row) == 1 else _line(row, widths))
    c = m.get("containers")
    if c and "skipped" not in c:
        text += ["", "# Containers on the real engine (test image; median of "
                     f"{len(c['api_start_s']['samples'])}, slowest in brackets)",
                 f"{'':36}{'docker CLI':>16}{'proxy API':>16}{'API vs CLI':>12}"]
        for label, cli, api in (("start: answer (ms)", "cli_run_s", "api_start_s"),
                                ("start to ready, health 200 (ms)", "cli_ready_s", "api_ready_s"),
                                ("stop (+ remove) (ms)", "cli_stop_rm_s", "api_stop_s")):
            left = f"{c[cli]['median'] * 1000:,.0f} [{c[cli]['max'] * 1000:,.0f}]"
            right = f"{c[api]['median'] * 1000:,.0f} [{c[api]['max'] * 1000:,.0f}]"
            text.append(f"{label:36}{left:>16}{right:>16}{'x%.2f' % (c[api]['median'] / c[cli]['median']):>12}")
        if "stubborn_stop_s" in c:
            s = c["stubborn_stop_s"]
            text.append(f"{'stop, SIGTERM ignored (ms)':36}{'':>16}{s['median'] * 1000:>9,.0f} [{s['max'] * 1000:,.0f}]"
                        f"  (stop_timeout {c['stubborn_stop_timeout_s']:g} s)")
        text.append("  (CLI: docker run -d / docker stop -t 5 && docker rm; API: POST .../start (202) / .../stop)")
    elif c:
        text += ["", f"# Containers: skipped ({c['skipped']})"]
    text += ["", "# Targets" + ("; in brackets, the same figure for the stack floor" if doc.get("stack_floor_targets") else "")]
    floors = {t["target"]: t for t in doc.get("stack_floor_targets") or []}
    for t in doc["targets"]:
        status = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        floor = floors.get(t["target"], {}).get("value")
        floor_text = "" if floor is None else f" [stack floor: {_figure(floor)}]"
        text.append(f"  {status:12} {t['target']}: {_figure(t['value'])}{floor_text} (target {t['limit']})")
    return "\n".join(text)
