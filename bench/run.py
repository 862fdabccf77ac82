#!/usr/bin/env python3
"""The proxy's benchmark: ``python bench/run.py [--quick] [--only ...] [--skip-containers]``.

Starts the test backend, the proxy under gunicorn with the shipped gunicorn.conf.py (one
worker, no Docker engine: it forwards blind) and nginx in front of the same backend, then
measures the three targets (direct, nginx, proxy) interleaved round by round, so that
drift on a shared machine hits all of them alike. Prints one table and writes
bench/results/latest.json. Everything listens on 127.0.0.1, every step has a time limit,
and everything started is stopped by its PID at the end.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import engine
import report
from targets import (BENCH, ROOT, Stack, Target, ensure_nginx, free_port, log, proxy_config, raise_nofile,
                     service_entry, start_backend, start_nginx, start_proxy, start_relay, start_stack_floor, SERVICE)

CHAT = "/v1/chat/completions"
PHASES = ("transfer", "chat", "streaming", "streams", "containers")

# What each phase does; --quick trades precision for a run of about a minute.
FULL = {"rounds": 3, "c1_count": 400, "c32_seconds": 3.0, "stream_count": 24, "stream_concurrency": 8,
        "s200_tokens": 20, "s200_delay": 0.1, "s1000_tokens": 10, "s1000_delay": 0.5,
        "transfer_bytes": 100 * 1000 * 1000, "transfer_rounds": 2, "container_rounds": 3}
QUICK = {"rounds": 1, "c1_count": 200, "c32_seconds": 1.5, "stream_count": 8, "stream_concurrency": 8,
         "s200_tokens": 10, "s200_delay": 0.1, "s1000_tokens": 5, "s1000_delay": 0.5,
         "transfer_bytes": 100 * 1000 * 1000, "transfer_rounds": 1, "container_rounds": 1}
STREAM_TOKENS, STREAM_DELAY = 64, 0.02  # the streaming phase: 64 token chunks, 20 ms apart


def chat_body(tokens: int, stream: bool) -> str:
    return json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Say hello to the benchmark"}],
                       "max_tokens": tokens, "stream": stream})


class Bench:
    def __init__(self, targets: list[Target], backend: Target, settings: dict):
        self.targets = targets
        self.backend = backend
        self.settings = settings

    def load(self, target: Target, spec: dict, *, timeout: float = 180, sample_rss: bool = False) -> dict:
        """Run one load in a client process; the target's CPU time and its worker's peak
        RSS are read around it (the client's own CPU is reported apart)."""
        spec = {**spec, "host": "127.0.0.1", "port": target.port, "path": target.prefix + spec["path"]}
        backend_pids = [self.backend.extra["backend"].pid]
        cpu_before, backend_before = target.cpu(), report.cpu_of(backend_pids)
        rss_before = target.worker_rss()
        peak = [rss_before, target.worker_private() if target.proc is not None else 0]
        client = subprocess.Popen([sys.executable, str(BENCH / "load.py")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stop_sampling = threading.Event()

        def sample() -> None:
            ticks = 0
            while not stop_sampling.wait(0.05):
                peak[0] = max(peak[0], target.worker_rss())
                ticks += 1
                if ticks % 5 == 0:  # smaps_rollup walks the page tables: less often
                    peak[1] = max(peak[1], target.worker_private())

        sampler = threading.Thread(target=sample, daemon=True)
        if sample_rss and target.proc is not None:
            sampler.start()
        try:
            out, err = client.communicate(json.dumps(spec), timeout=timeout)
        except subprocess.TimeoutExpired:
            client.kill()
            client.communicate()
            raise RuntimeError(f"load {spec['kind']} on {target.name} ran over {timeout:g} s") from None
        except BaseException:  # Ctrl-C, SIGTERM or the run's deadline: the client goes too
            client.kill()
            client.wait(5)
            raise
        finally:
            stop_sampling.set()
        if client.returncode != 0:
            raise RuntimeError(f"load client failed on {target.name}:\n{err[-3000:]}")
        result = json.loads(out)
        result["cpu_s"] = target.cpu() - cpu_before if target.proc is not None else None
        result["backend_cpu_s"] = report.cpu_of(backend_pids) - backend_before
        result["rss_before"] = rss_before if target.proc is not None else None
        result["rss_peak"] = max(peak[0], target.worker_rss()) if target.proc is not None else None
        result["private_peak"] = peak[1] if target.proc is not None else None
        return result

    def rounds(self, count: int, step) -> dict[str, list]:
        """step(target, round) for every target, round by round; the order rotates so no
        target always goes first (or right after another's heavy load)."""
        out: dict[str, list] = {t.name: [] for t in self.targets}
        for r in range(count):
            shift = r % len(self.targets)
            order = self.targets[shift:] + self.targets[:shift]
            for target in order:
                out[target.name].append(step(target, r))
        return out

    # -- phases ------------------------------------------------------------------------

    def warm_up(self) -> None:
        for target in self.targets:
            self.load(target, {"kind": "requests", "path": CHAT, "body": chat_body(16, False), "concurrency": 4,
                               "count": 100, "expect": "chat.completion"})
            self.load(target, {"kind": "streams", "path": f"{CHAT}?delay=0", "body": chat_body(8, True),
                               "expect_events": 9, "count": 8, "concurrency": 4})

    def chat(self) -> dict:
        s = self.settings
        c1 = {"kind": "requests", "path": CHAT, "body": chat_body(16, False), "concurrency": 1,
              "count": s["c1_count"], "expect": "chat.completion"}
        c32 = {**c1, "concurrency": 32, "count": None, "duration": s["c32_seconds"]}
        runs = self.rounds(s["rounds"], lambda t, r: {"c1": self.load(t, c1), "c32": self.load(t, c32)})
        return report.summarise_chat(runs)

    def streaming(self) -> dict:
        s = self.settings
        spec = {"kind": "streams", "path": f"{CHAT}?delay={STREAM_DELAY}", "body": chat_body(STREAM_TOKENS, True),
                "expect_events": STREAM_TOKENS + 1, "count": s["stream_count"], "concurrency": s["stream_concurrency"]}
        return report.summarise_streams(self.rounds(s["rounds"], lambda t, r: self.load(t, spec)))

    def streams(self, count: int, tokens: int, delay: float) -> dict:
        spec = {"kind": "streams", "path": f"{CHAT}?delay={delay}", "body": chat_body(tokens, True),
                "expect_events": tokens + 1, "count": count, "burst": True, "timeout": 60 + tokens * delay}

        def step(target: Target, r: int) -> dict:
            result = self.load(target, spec, sample_rss=True)
            time.sleep(1.0)  # let the burst's connections close before the next target's
            return result
        return report.summarise_streams(self.rounds(self.settings["rounds"], step))

    def transfer(self) -> dict:
        s = self.settings
        total = s["transfer_bytes"]
        baseline = {t.name: t.worker_rss() for t in self.targets}  # before any transfer, after warm-up

        def step(target: Target, r: int) -> dict:
            return {"upload": self.load(target, {"kind": "upload", "path": "/upload", "bytes": total}, sample_rss=True),
                    "download": self.load(target, {"kind": "download", "path": f"/download?bytes={total}",
                                                   "bytes": total}, sample_rss=True)}
        return report.summarise_transfer(self.rounds(s["transfer_rounds"], step), baseline, total)


def forwarding(args, settings: dict, stack: Stack, tmp: Path, results: dict, nginx_binary: str) -> None:
    """The forwarding phases: backend, nginx and proxy (and alt), measured round by round."""
    backend = start_backend(stack, tmp)
    proxy = start_proxy(stack, tmp, proxy_config(free_port(), {SERVICE: service_entry(backend.port)}),
                        root=args.proxy_root, workers=args.workers)
    nginx = start_nginx(stack, tmp, backend.port, nginx_binary)
    targets = [backend, nginx, proxy]
    if args.compare_root:
        targets.append(start_proxy(stack, tmp, proxy_config(free_port(), {SERVICE: service_entry(backend.port)}),
                                   name="alt", root=args.compare_root, workers=args.workers))
        results["compare_root"] = str(args.compare_root)
    if args.floor:
        targets.append(start_stack_floor(stack, tmp, backend.port))
        targets.append(start_relay(stack, tmp, backend.port))
    bench = Bench(targets, backend, settings)
    log(f"backend :{backend.port}, nginx :{nginx.port}, proxy :{proxy.port} (worker pid {proxy.worker_pid()})")
    bench.warm_up()
    results["idle"] = report.idle(bench.targets)
    if "transfer" in args.phases:
        log("transfer: 100 MB up and down")
        results["transfer"] = bench.transfer()
    if "chat" in args.phases:
        log("chat: non-streaming, concurrency 1 and 32")
        results["chat"] = bench.chat()
    if "streaming" in args.phases:
        log(f"streaming: {STREAM_TOKENS} chunks, {STREAM_DELAY * 1000:g} ms apart")
        results["streaming"] = bench.streaming()
    if "streams" in args.phases:
        log("streams: 200 at once")
        results["streams200"] = bench.streams(200, settings["s200_tokens"], settings["s200_delay"])
        log("streams: 1,000 at once")
        results["streams1000"] = bench.streams(1000, settings["s1000_tokens"], settings["s1000_delay"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, shorter loads (about a minute)")
    parser.add_argument("--rounds", type=int, help="rounds per phase (default 3, transfers 2; 1 with --quick)")
    parser.add_argument("--only", help=f"comma-separated phases to run, of: {', '.join(PHASES)}")
    parser.add_argument("--skip-containers", action="store_true", help="leave out the real-engine container part")
    parser.add_argument("--proxy-root", type=Path, default=ROOT,
                        help="checkout whose proxy is measured (default: this repo); e.g. a scratch copy")
    parser.add_argument("--compare-root", type=Path,
                        help="also measure the proxy of this checkout, as column 'alt' (e.g. a scratch copy with a change)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure two floors: the least Flask + requests + gunicorn-gevent forwarder "
                             "(bench/stack_floor.py) as column 'stack', and a bare gevent byte relay "
                             "(bench/relay_floor.py) as column 'relay'")
    parser.add_argument("--workers", type=int, default=1,
                        help="the proxy's gunicorn workers (PROXY_WORKERS; default 1, like nginx's one worker, so "
                             "one process carries the whole load; the shipped default is 2)")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "latest.json")
    parser.add_argument("--max-seconds", type=int, default=900, help="hard limit for the whole run")
    args = parser.parse_args(argv)
    phases = list(PHASES) if not args.only else [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    if args.skip_containers and "containers" in phases:
        phases.remove("containers")
    args.phases = phases
    return args


def _deadline(signum, frame):
    raise TimeoutError("the benchmark ran over --max-seconds")


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = dict(QUICK if args.quick else FULL, proxy_workers=args.workers)
    if args.rounds:
        settings["rounds"] = settings["transfer_rounds"] = settings["container_rounds"] = args.rounds
    raise_nofile()
    # Installs first, outside the run's time limit: on a fresh machine they take minutes.
    nginx_binary = ensure_nginx() if set(args.phases) - {"containers"} else None
    if "containers" in args.phases:
        engine.set_up()  # what still stands in the way is reported when the part runs
    signal.signal(signal.SIGALRM, _deadline)
    signal.signal(signal.SIGTERM, _terminate)
    signal.alarm(args.max_seconds)
    started = time.time()
    results: dict = {"settings": settings, "phases": args.phases, "proxy_root": str(args.proxy_root)}
    with tempfile.TemporaryDirectory(prefix="inference-proxy-bench-") as tmp_name, Stack() as stack:
        tmp = Path(tmp_name)
        if set(args.phases) - {"containers"}:
            forwarding(args, settings, stack, tmp, results, nginx_binary)
        stack.close()  # the forwarding stack is done: free the cores for the engine part
        if "containers" in args.phases:
            log("containers: start/stop API next to docker run -d, on the real engine")
            results["containers"] = engine.run(stack, tmp, settings["container_rounds"], args.proxy_root)
    signal.alarm(0)
    results["elapsed_s"] = time.time() - started
    document = report.document(results)
    print(report.table(document))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    log(f"wrote {args.out} ({results['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
