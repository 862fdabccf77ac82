#!/usr/bin/env bash
# ensure_registry.sh -- make sure Debian's docker-registry (Distribution 2.8) is installed for
# the image pull tests.
#
# tests/test_image_pulls.py runs its own registry (`docker-registry serve CONFIG`, on
# 127.0.0.1 and a temporary directory) and stops it by PID: only the binary is needed. The
# package's own service is kept from starting while it installs (a policy-rc.d that refuses,
# for the length of the install): the tests never rely on a registry on port 5000. Idempotent: when /usr/bin/docker-registry exists nothing is touched.
set -euo pipefail

export PATH="${PATH:+$PATH:}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

log() { printf '[ensure_registry] %s\n' "$*" >&2; }

if [[ -x /usr/bin/docker-registry ]]; then
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
    log "/usr/bin/docker-registry is missing and installing it needs root: apt-get install docker-registry"
    exit 1
fi
log "/usr/bin/docker-registry missing; installing Debian's docker-registry"
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"  # 101: "action not allowed" for invoke-rc.d
    chmod +x "$policy"
    own_policy=1
fi
cleanup() { if [[ "$own_policy" -eq 1 ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT
timeout 600 apt-get update
timeout 600 apt-get install -y --no-install-recommends docker-registry
/usr/bin/docker-registry --version >&2
