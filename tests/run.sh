#!/usr/bin/env bash
# Everything the tests need on a fresh Debian machine, then the tests themselves:
#   bash tests/run.sh [pytest arguments]
# Installs the Python dependencies, installs and starts a Docker engine when there is none,
# builds the test images locally (no registry is reachable) -- among them the real llama-server,
# compiled from source on the first run (about 5 minutes), cached afterwards -- installs
# Debian's Chromium for the browser tests when it is missing, and Debian's docker-registry for the
# image pull tests, then runs pytest. Idempotent:
# a second run skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r tests/requirements.txt
bash tests/setup/ensure_docker.sh
bash tests/setup/build_images.sh
bash tests/setup/build_llama_image.sh
bash tests/setup/ensure_browser.sh
bash tests/setup/ensure_registry.sh
exec python3 -m pytest -c tests/pytest.ini --rootdir . "$@"
