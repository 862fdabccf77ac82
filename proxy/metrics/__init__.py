"""Prometheus metrics: the proxy's own families, the ones read at scrape time, and each
model server's own, relabelled with its service.

- ``multiproc``: the directory gunicorn's workers share their counts through (made by the
  master, before any worker imports ``prometheus_client``);
- ``families``: every family the proxy records, with one small function per recording;
- ``request_meter``: one request's recordings, made on the forwarding path;
- ``usage``: token counts and speed read from the end of an answer;
- ``collector``: what is read when scraped (in flight, queued, states, the engine);
- ``backends``: the model servers' own ``/metrics``, fetched in parallel and relabelled.

Importing this package imports nothing else: ``gunicorn.conf.py`` uses ``multiproc``
in the master, where ``prometheus_client`` must not be imported before its directory is set.
"""
