#!/usr/bin/env python3
"""What each layer of the fixed stack costs per request: ``python bench/layers.py``.

Runs the same non-streaming chat request (keep-alive, concurrency 32, then 1) against five
apps under gunicorn with one gevent worker, interleaved round by round, and prints the
CPU per request of each (about 1.5 minutes):

  wsgi_fixed    a fixed answer from a bare WSGI function: gunicorn and gevent alone
  flask_fixed   the same answer from a Flask view: plus Flask
  wsgi_forward  a bare WSGI function forwarding through a requests adapter: plus requests
  stack         a Flask view forwarding through a requests adapter (the stack floor)
  proxy         the proxy, ``gunicorn -c gunicorn.conf.py wsgi:app``

The apps are in bench/stack_floor.py. Figures go to bench/results/layers.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import report
from run import CHAT, Bench, chat_body
from targets import (BENCH, SERVICE, Stack, free_port, log, proxy_config, raise_nofile, service_entry, start_backend,
                     start_proxy, start_stack_floor)

LAYERS = [("wsgi_fixed", "a fixed answer from WSGI (gunicorn + gevent)"),
          ("flask_fixed", "the same from a Flask view"),
          ("wsgi_forward", "WSGI forwarding through a requests adapter"),
          ("stack", "Flask forwarding through a requests adapter (stack floor)"),
          ("proxy", "the proxy")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each c=32 load")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "layers.json")
    args = parser.parse_args(argv)
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="inference-proxy-layers-") as tmp_name, Stack() as stack:
        tmp = Path(tmp_name)
        backend = start_backend(stack, tmp)
        targets = [start_stack_floor(stack, tmp, backend.port, app=name if name != "stack" else "app", name=name)
                   for name, _ in LAYERS[:-1]]
        targets.append(start_proxy(stack, tmp, proxy_config(free_port(), {SERVICE: service_entry(backend.port)})))
        bench = Bench(targets, backend, {})
        c32 = {"kind": "requests", "path": CHAT, "body": chat_body(16, False), "concurrency": 32,
               "count": None, "duration": args.seconds, "expect": "chat.completion"}
        c1 = {**c32, "concurrency": 1, "duration": args.seconds / 2}
        for target in targets:  # warm-up: imports, pools, first connections
            bench.load(target, {**c32, "concurrency": 4, "duration": None, "count": 200})
        log(f"layers: {len(targets)} apps, {args.rounds} rounds of c=32 and c=1")
        runs = bench.rounds(args.rounds, lambda t, r: {"c32": bench.load(t, c32), "c1": bench.load(t, c1)})
    figures = {}
    for name, _ in LAYERS:
        figures[name] = {}
        for key in ("c32", "c1"):
            cpu = sum(run[key]["cpu_s"] for run in runs[name])
            done = sum(report.requests_served(run[key]) for run in runs[name])
            errors = sum(run[key]["errors"] for run in runs[name])
            figures[name][key] = {"cpu_us_per_request": cpu / max(done, 1) * 1e6, "requests": done, "errors": errors}
    width = max(len(what) for _, what in LAYERS) + 2
    print(f"{'':{14 + width}}{'CPU per request, c=32':>22}{'c=1':>10}")
    for name, what in LAYERS:
        f = figures[name]
        errors = f["c32"]["errors"] + f["c1"]["errors"]
        print(f"{name:14}{what:{width}}{f['c32']['cpu_us_per_request']:>19,.0f} us{f['c1']['cpu_us_per_request']:>7,.0f} us"
              + (f"  ({errors} errors)" if errors else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "seconds": args.seconds, "layers": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
