#!/usr/bin/env bash
# build_images.sh -- build the local Docker images the integration tests use.
#
#   inference-proxy-test-base:bookworm
#       Debian bookworm minbase + python3, made with debootstrap and
#       `docker import`. No container registry is reachable from the test
#       machines, so nothing can be pulled: the base image is built from a
#       local root filesystem instead. Cached by tag: skipped when the tag
#       already exists (delete it with `docker rmi` to force a rebuild).
#   inference-proxy-test-backend:latest
#       tests/backend/Dockerfile (FROM the base image, adds server.py), built
#       with the classic builder (DOCKER_BUILDKIT=0; no buildx here). Rebuilt
#       on every run, which is near-instant thanks to docker's layer cache.
#
# The debootstrap mirror is read at run time from this machine's apt
# configuration (deb822 *.sources or sources.list: the entry whose suites
# include plain `bookworm`, i.e. the main archive, not -security/-updates),
# so no registry host name is hard-coded. Override with DEBOOTSTRAP_MIRROR.
#
# Requires a running engine: run tests/setup/ensure_docker.sh first (root).
# Works from any cwd; paths are derived from this script's location.
set -euo pipefail

export PATH="${PATH:+$PATH:}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"

SUITE=bookworm
BASE_IMAGE="inference-proxy-test-base:${SUITE}"
BACKEND_IMAGE="inference-proxy-test-backend:latest"
BACKEND_DIR="$REPO_ROOT/tests/backend"
CACHE_DIR="${INFERENCE_PROXY_CACHE_DIR:-/var/cache/inference-proxy}"

log() { printf '[build_images] %s\n' "$*" >&2; }

if ! timeout 10 docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; then
    log "docker engine not reachable; run tests/setup/ensure_docker.sh first"
    exit 1
fi

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# Print the main-archive mirror URI for $SUITE from the apt configuration.
apt_mirror() {
    local f uri
    # deb822 (*.sources): stanzas separated by blank lines; fields may
    # continue on indented lines; '#' lines are comments.
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r "$f" ]] || continue
        uri="$(awk -v suite="$SUITE" '
            function flush(   n, i, s, u, ok) {
                if (done) return
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no") {
                    n = split(suites, s, /[ \t]+/); ok = 0
                    for (i = 1; i <= n; i++) if (s[i] == suite) ok = 1
                    if (ok) {
                        n = split(uris, u, /[ \t]+/)
                        for (i = 1; i <= n; i++)
                            if (u[i] ~ /^(https?|file):/) { print u[i]; done = 1; exit }
                    }
                }
                types = suites = uris = enabled = ""; field = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/   { val = $0; sub(/^[ \t]+/, "", val)
                         if (field == "types") types = types " " val
                         else if (field == "suites") suites = suites " " val
                         else if (field == "uris") uris = uris " " val
                         next }
            {
                key = tolower($0); sub(/:.*/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
                field = key
                if (key == "types") types = val
                else if (key == "suites") suites = val
                else if (key == "uris") uris = val
                else if (key == "enabled") enabled = val
            }
            END { flush() }
        ' "$f")"
        if [[ -n "$uri" ]]; then
            printf '%s\n' "$uri"
            return 0
        fi
    done
    # One-line format: deb [options] URI SUITE COMPONENTS...
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        uri="$(awk -v suite="$SUITE" '
            $1 != "deb" { next }
            {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite && $i ~ /^(https?|file):/) { print $i; exit }
            }
        ' "$f")"
        if [[ -n "$uri" ]]; then
            printf '%s\n' "$uri"
            return 0
        fi
    done
    return 1
}

build_base() {
    local mirror workdir
    if [[ "$(id -u)" -ne 0 ]]; then
        log "building $BASE_IMAGE needs root (debootstrap)"
        exit 1
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        export DEBIAN_FRONTEND=noninteractive
        timeout 600 apt-get update
        timeout 600 apt-get install -y --no-install-recommends debootstrap
    fi
    mirror="${DEBOOTSTRAP_MIRROR:-}"
    if [[ -z "$mirror" ]] && ! mirror="$(apt_mirror)"; then
        log "no apt source for suite '$SUITE' found in /etc/apt; set DEBOOTSTRAP_MIRROR"
        exit 1
    fi
    mkdir -p "$CACHE_DIR"
    workdir="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    # shellcheck disable=SC2064
    trap "cleanup_rootfs '$workdir'" EXIT
    log "debootstrap $SUITE (minbase + python3) from $mirror into $workdir"
    if ! timeout 1200 debootstrap --variant=minbase --include=python3 \
        "$SUITE" "$workdir/rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1; then
        log "debootstrap failed; last lines of its log:"
        tail -n 30 "$workdir/debootstrap.log" >&2 || true
        tail -n 30 "$workdir/rootfs/debootstrap/debootstrap.log" >&2 2>/dev/null || true
        exit 1
    fi
    # Trim things a test image does not need (apt lists/caches, docs, man pages).
    rm -rf "$workdir/rootfs/var/lib/apt/lists/"* "$workdir/rootfs/var/cache/apt/"*.bin \
        "$workdir/rootfs/var/cache/apt/archives/"*.deb \
        "$workdir/rootfs/usr/share/doc/"* "$workdir/rootfs/usr/share/man/"* \
        "$workdir/rootfs/usr/share/info/"*
    log "importing as $BASE_IMAGE"
    tar --numeric-owner -C "$workdir/rootfs" -c . |
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["/bin/bash"]' \
            --message "debootstrap --variant=minbase --include=python3 $SUITE" \
            - "$BASE_IMAGE" >/dev/null
    cleanup_rootfs "$workdir"
    trap - EXIT
}

# Remove a debootstrap work dir. A failed/interrupted debootstrap can leave
# proc/sys/dev mounts inside the target: unmount those first and never let
# rm cross into another filesystem.
cleanup_rootfs() {
    local dir="$1" m
    [[ -d "$dir" ]] || return 0
    while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
    rm -rf --one-file-system "$dir"
}

# Serialise concurrent runs (two builds of the base would both debootstrap).
mkdir -p "$CACHE_DIR" 2>/dev/null || true
if [[ -w "$CACHE_DIR" ]]; then
    exec 9>"$CACHE_DIR/build_images.lock"
    if ! timeout 1800 flock 9; then
        log "timed out waiting for another build_images.sh run"
        exit 1
    fi
fi

if image_exists "$BASE_IMAGE"; then
    log "$BASE_IMAGE exists; skipping debootstrap (docker rmi it to rebuild)"
else
    start=$SECONDS
    build_base
    log "built $BASE_IMAGE in $((SECONDS - start))s"
fi

if [[ ! -f "$BACKEND_DIR/Dockerfile" || ! -f "$BACKEND_DIR/server.py" ]]; then
    log "missing $BACKEND_DIR/Dockerfile or $BACKEND_DIR/server.py"
    exit 1
fi
log "building $BACKEND_IMAGE from $BACKEND_DIR"
# The classic builder never pulls FROM images unless --pull is given, so the
# locally imported base is used as is.
# Output is kept only for failures (a successful classic build just prints the
# "legacy builder is deprecated" notice).
if ! out="$(DOCKER_BUILDKIT=0 timeout 600 docker build -q -t "$BACKEND_IMAGE" \
    -f "$BACKEND_DIR/Dockerfile" "$BACKEND_DIR" 2>&1)"; then
    printf '%s\n' "$out" >&2
    log "docker build of $BACKEND_IMAGE failed"
    exit 1
fi
log "built $BACKEND_IMAGE ($(docker image inspect --format '{{.Id}}' "$BACKEND_IMAGE" | cut -c1-19))"
