"""Prometheus metrics: the proxy's own families, and the ones read at scrape time.

- ``multiproc``: the directory gunicorn's workers share their counts through (made by the
  master, before any worker imports ``prometheus_client``);
- ``families``: every family the proxy records, with one small function per recording;
- ``request_meter``: one request's recordings, made on the forwarding path;
- ``usage``: token counts and speed read from the end of an answer;
- ``collector``: what is read when scraped (in flight, queued, states, the engine).

Importing this package imports nothing else: ``gunicorn.conf.py`` uses ``multiproc``
in the master, where ``prometheus_client`` must not be imported before its directory is set.
"""
