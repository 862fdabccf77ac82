#!/usr/bin/env bash
# ensure_browser.sh -- make sure Debian's Chromium is installed for the browser tests.
#
# The cross-site tests (tests/test_cross_site.py, tests/browser.py) drive /usr/bin/chromium
# headless through Playwright. Playwright's own `playwright install` downloads a browser
# build, which the test machines cannot reach: the browser comes from Debian's packages.
# Idempotent: when /usr/bin/chromium exists nothing is touched (well under a second).
set -euo pipefail

export PATH="${PATH:+$PATH:}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

log() { printf '[ensure_browser] %s\n' "$*" >&2; }

if [[ -x /usr/bin/chromium ]]; then
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
    log "/usr/bin/chromium is missing and installing it needs root: apt-get install chromium"
    exit 1
fi
log "/usr/bin/chromium missing; installing Debian's chromium"
export DEBIAN_FRONTEND=noninteractive
timeout 600 apt-get update
# Recommends stay out: the tests need the browser itself, not its fonts and extras.
timeout 900 apt-get install -y --no-install-recommends chromium
/usr/bin/chromium --version >&2
