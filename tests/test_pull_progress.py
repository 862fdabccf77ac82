"""Docker's pull messages folded into layers and bytes (pure: no engine), as a real pull
sends them (the shapes come from Docker 20.10's /images/create stream)."""
from __future__ import annotations

from proxy.services.engine.pulls import PullProgress

PULL = [
    {"status": "Pulling from ipt/backend", "id": "0f1e2d3c4b5a"},
    {"status": "Already exists", "progressDetail": {}, "id": "aaa"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "bbb"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "ccc"},
    {"status": "Waiting", "progressDetail": {}, "id": "ccc"},
    {"status": "Downloading", "progressDetail": {"current": 1000, "total": 4000}, "id": "bbb"},
    {"status": "Downloading", "progressDetail": {"current": 3000, "total": 4000}, "id": "bbb"},
    {"status": "Verifying Checksum", "progressDetail": {}, "id": "bbb"},
    {"status": "Download complete", "progressDetail": {}, "id": "bbb"},
    {"status": "Downloading", "progressDetail": {"current": 500, "total": 6000}, "id": "ccc"},
    {"status": "Extracting", "progressDetail": {"current": 32768, "total": 9000}, "id": "bbb"},
    {"status": "Pull complete", "progressDetail": {}, "id": "bbb"},
    {"status": "Download complete", "progressDetail": {}, "id": "ccc"},
    {"status": "Pull complete", "progressDetail": {}, "id": "ccc"},
    {"status": "Digest: sha256:0123"},
    {"status": "Status: Downloaded newer image for 127.0.0.1:5000/ipt/backend:x"},
]


def test_layers_and_bytes_follow_the_messages_and_never_go_back():
    progress = PullProgress()
    seen = []
    for message in PULL:
        if progress.update(message):
            seen.append(progress.counts().as_dict())
    assert seen[0] == {"layers_done": 1, "layers_total": 1, "bytes_done": 0, "bytes_total": 0, "percent": None}
    assert seen[-1] == {"layers_done": 3, "layers_total": 3, "bytes_done": 10000, "bytes_total": 10000,
                        "percent": 100.0}
    assert {"layers_done": 1, "layers_total": 3, "bytes_done": 3000, "bytes_total": 4000, "percent": 75.0} in seen
    done = [entry["bytes_done"] for entry in seen]
    assert done == sorted(done)  # extraction's own byte counts are not download progress


def test_the_images_own_lines_are_no_layers():
    progress = PullProgress()
    assert not any(progress.update(message) for message in (PULL[0], PULL[-2], PULL[-1], {"status": ""}, {}))
    assert progress.counts() == (0, 0, 0, 0)
