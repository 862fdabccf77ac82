#!/usr/bin/env python3
"""Profile the proxy's worker under load with py-spy (``pip install py-spy``).

    python bench/profile.py --load chat|stream [--seconds 20] [--proxy-root PATH] [--target stack]

Starts the test backend and the proxy (one worker, no engine), drives it with the
benchmark's load client, and records the worker twice: a flame graph
(bench/profiles/<name>.svg) and raw collapsed stacks (kept in a temporary directory, or
as bench/profiles/<name>.txt with --keep-raw), which are summarised into
bench/profiles/<name>-summary.txt: where the worker's CPU goes (self and inclusive shares
of on-CPU samples) and the share per package. ``--target stack`` profiles the stack floor
(bench/stack_floor.py) instead, to see what the fixed stack alone spends.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from run import CHAT, chat_body
from targets import (BENCH, ROOT, SERVICE, Stack, free_port, log, proxy_config, raise_nofile, service_entry,
                     start_backend, start_proxy, start_stack_floor)

def load_spec(kind: str, seconds: float, target) -> dict:
    base = {"host": "127.0.0.1", "port": target.port}
    if kind == "chat":
        return {**base, "kind": "requests", "path": target.prefix + CHAT, "concurrency": 32, "duration": seconds,
                "expect": "chat.completion", "body": chat_body(16, False)}
    # 64 streams of 64 chunks 20 ms apart at a time: about 3,200 chunks a second
    count = int(64 * seconds / 1.35) + 64
    return {**base, "kind": "streams", "path": target.prefix + CHAT + "?delay=0.02", "concurrency": 64,
            "count": count, "expect_events": 65, "timeout": 120, "body": chat_body(64, True)}


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _package(path: str) -> str:
    """site-packages/<pkg>/..., the proxy's own files, or the standard library module."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/proxy/" in path:
        return "proxy (ours)"
    name = Path(path).name
    return f"stdlib {name}" if name else path


def summarise(raw: Path, worker: int, top: int = 25) -> str:
    self_time: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    packages: collections.Counter = collections.Counter()
    total = other_threads = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # All greenlets run on the main thread. gevent's threadpool threads (DNS lookups)
        # wait in a native lock that py-spy takes for activity: leave them out.
        if stack.startswith("thread (") and not stack.startswith(f"thread ({worker})"):
            other_threads += count
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        names = []
        for frame in frames:
            match = _FRAME.match(frame)
            func, path = (match["func"], match["file"]) if match else (frame, "")
            names.append((f"{func} ({Path(path).name})", path))
        self_time[names[-1][0]] += count
        packages[_package(names[-1][1])] += count
        for name in {n for n, _ in names}:
            inclusive[name] += count
    lines = [f"{total} on-CPU samples of the main thread ({other_threads} of other threads left out)", "",
             "self time (where the CPU is spent):"]
    lines += [f"  {c / total:6.1%}  {name}" for name, c in self_time.most_common(top)]
    lines += ["", "self time by package:"]
    lines += [f"  {c / total:6.1%}  {name}" for name, c in packages.most_common(15)]
    lines += ["", "inclusive time (the function and what it calls):"]
    lines += [f"  {c / total:6.1%}  {name}" for name, c in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", choices=["chat", "stream"], required=True)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--proxy-root", type=Path, default=ROOT)
    parser.add_argument("--target", choices=["proxy", "stack"], default="proxy",
                        help="the proxy, or the least forwarder of the fixed stack (bench/stack_floor.py)")
    parser.add_argument("--name", help="output name (default: the load's)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    parser.add_argument("--keep-raw", action="store_true", help="keep the raw stacks (MBs) in bench/profiles")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy")
    if not py_spy:
        parser.error("py-spy is missing: pip install py-spy")
    name = args.name or (args.load if args.target == "proxy" else f"{args.target}-{args.load}")
    out_dir = BENCH / "profiles"
    out_dir.mkdir(exist_ok=True)
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="inference-proxy-profile-") as tmp_name, Stack() as stack:
        tmp = Path(tmp_name)
        backend = start_backend(stack, tmp)
        if args.target == "stack":
            proxy = start_stack_floor(stack, tmp, backend.port)
        else:
            proxy = start_proxy(stack, tmp, proxy_config(free_port(), {SERVICE: service_entry(backend.port)}),
                                root=args.proxy_root)
        worker = proxy.worker_pid()
        spec = load_spec(args.load, 2 * args.seconds + 4, proxy)
        client = stack.add("load", subprocess.Popen([sys.executable, str(BENCH / "load.py")], stdin=subprocess.PIPE,
                                                    stdout=subprocess.PIPE, text=True))
        client.stdin.write(json.dumps(spec))
        client.stdin.close()
        log(f"profiling worker {worker} under the {args.load} load, {args.seconds:g} s per recording")
        before = proxy.cpu()
        raw = (out_dir if args.keep_raw else tmp) / f"{name}.txt"
        for fmt, output in (("raw", raw), ("flamegraph", out_dir / f"{name}.svg")):
            subprocess.run([py_spy, "record", "--pid", str(worker), "--duration", str(int(args.seconds)),
                            "--rate", str(args.rate), "--format", fmt, "--full-filenames", "--threads",
                            *(["--gil"] if args.gil else []), "--output", str(output)],
                           check=True, timeout=args.seconds + 60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = json.loads(client.stdout.read() or "{}")
        client.wait(60)
        cpu = proxy.cpu() - before
        summary = summarise(raw, worker)
    done = result.get("completed") or result.get("events") or 0
    unit = "request" if args.load == "chat" else "chunk"
    print(f"{args.load}: {done} {unit}s, errors {result.get('errors')} {result.get('error_samples')}, "
          f"proxy CPU {cpu:.2f} s, {cpu / max(done, 1) * 1e6:.0f} us per {unit} "
          f"(py-spy's sampling slows the worker: read the shares, not this figure)")
    print(summary)
    (out_dir / f"{name}-summary.txt").write_text(summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
