#!/usr/bin/env bash
# ensure_docker.sh -- make sure a local Docker engine is installed and answering.
#
# What it does (idempotent; run as root on Debian bookworm):
#   1. If `dockerd` is missing: `apt-get update` once, then install Debian's
#      `docker.io` (which pulls in containerd, runc, iptables, docker-proxy,
#      tini as docker-init) plus `debootstrap`, needed by build_images.sh;
#      and `iproute2` when `ip` is missing (the tests' second engine needs it).
#   2. If `docker info` already answers: exit immediately (well under 1 s,
#      nothing is touched).
#   3. Otherwise start `dockerd` detached (setsid + nohup, own session, so it
#      outlives this script and the shell that ran it), logging to
#      $INFERENCE_PROXY_DOCKERD_LOG (default /tmp/inference-proxy-dockerd.log),
#      and wait (deadline $INFERENCE_PROXY_DOCKERD_TIMEOUT, default 60 s)
#      until `docker info` answers; on failure print the log tail and exit 1.
#
# Why: the integration tests run the proxy against backend containers, but the
# test machines ship only the docker CLI, no engine and no init system
# (systemd/sysv cannot start the service; policy-rc.d blocks it), so the
# daemon has to be started by hand.
#
# Daemon flags: none are needed on the reference sandbox (Firecracker VM,
# kernel 6.x, cgroup v1, ext4 root): overlay2 and iptables-nft both work, and
# dockerd's own storage-driver probing falls back (fuse-overlayfs/vfs) when
# overlay2 cannot be used. Two robustness fallbacks are built in:
#   * if dockerd dies with an iptables/NAT error (no netfilter in the kernel,
#     broken nft backend), it is restarted with --iptables=false
#     --ip-masq=false: ports published on 127.0.0.1 are then still served by
#     the userland docker-proxy, which is all the tests need;
#   * if it dies with an overlay/storage-driver error, it is restarted with
#     --storage-driver=vfs (slow and disk hungry, but works everywhere).
# Extra flags can be forced with INFERENCE_PROXY_DOCKERD_ARGS
# (e.g. "--storage-driver=vfs"); they only apply when this script starts
# the daemon.
set -euo pipefail

export PATH="${PATH:+$PATH:}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

LOG="${INFERENCE_PROXY_DOCKERD_LOG:-/tmp/inference-proxy-dockerd.log}"
DEADLINE_S="${INFERENCE_PROXY_DOCKERD_TIMEOUT:-60}"
PIDFILE=/var/run/docker.pid # dockerd's default --pidfile
read -r -a EXTRA_ARGS <<<"${INFERENCE_PROXY_DOCKERD_ARGS:-}"

log() { printf '[ensure_docker] %s\n' "$*" >&2; }

docker_up() {
    # `docker info` exits non-zero when the daemon cannot be reached; the
    # format keeps it cheap and the timeout keeps a wedged daemon from hanging us.
    local v
    v="$(timeout 10 docker info --format '{{.ServerVersion}}' 2>/dev/null)" || return 1
    [[ -n "$v" ]]
}

if [[ "$(id -u)" -ne 0 ]]; then
    if docker_up; then exit 0; fi
    log "must run as root to install/start dockerd"
    exit 1
fi

# --- 1. install ---------------------------------------------------------------
pkgs=()
if ! command -v dockerd >/dev/null 2>&1; then
    pkgs+=(docker.io iptables)
    command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
fi
# `ip` makes the bridge of the tests' second engine (tests/engines.py).
command -v ip >/dev/null 2>&1 || pkgs+=(iproute2)
if ((${#pkgs[@]})); then
    log "installing: ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update
    # --no-install-recommends: skip needrestart/apparmor/git; nothing here needs them.
    timeout 900 apt-get install -y --no-install-recommends "${pkgs[@]}"
fi
if ! command -v docker >/dev/null 2>&1; then
    log "docker CLI missing (docker.io should have provided /usr/bin/docker)"
    exit 1
fi

# --- 2. already running? ------------------------------------------------------
if docker_up; then
    exit 0
fi

# --- 3. start dockerd ---------------------------------------------------------
dockerd_pid_alive() {
    # Is $1 a live dockerd process?
    [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null &&
        [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == dockerd ]]
}

daemon_alive() {
    # The PID we launched (which may still be setsid/nohup a few ms before it
    # execs dockerd), or else whatever live dockerd the pid file names.
    kill -0 "$1" 2>/dev/null && return 0
    dockerd_pid_alive "$(cat "$PIDFILE" 2>/dev/null || true)"
}

wait_for_docker() {
    # wait_for_docker PID SECONDS -> 0 when up, 1 when the daemon died, 2 on timeout
    local pid="$1" end=$((SECONDS + $2))
    while ((SECONDS < end)); do
        docker_up && return 0
        if ! daemon_alive "$pid"; then
            # It may have exited right after the socket came up; re-check once.
            docker_up && return 0
            return 1
        fi
        sleep 0.25
    done
    docker_up && return 0
    return 2
}

start_dockerd() {
    # start_dockerd ARGS... ; echoes the new dockerd PID
    {
        printf '\n===== %s ensure_docker.sh: starting dockerd %s =====\n' \
            "$(date -u +%FT%TZ)" "$*"
    } >>"$LOG"
    # setsid: own session/process group, so job-control kills of the calling
    # shell do not take the daemon down; nohup + </dev/null: no tty ties.
    setsid nohup dockerd "$@" </dev/null >>"$LOG" 2>&1 &
    echo $!
}

# A dockerd may already be starting (e.g. a concurrent run of this script):
# wait for it instead of starting a second one.
if [[ -s "$PIDFILE" ]]; then
    oldpid="$(cat "$PIDFILE" 2>/dev/null || true)"
    if dockerd_pid_alive "$oldpid"; then
        log "dockerd (pid $oldpid) is running but not answering yet; waiting"
        if wait_for_docker "$oldpid" "$DEADLINE_S"; then exit 0; fi
        log "dockerd pid $oldpid did not come up within ${DEADLINE_S}s; last log lines:"
        tail -n 40 "$LOG" >&2 || true
        exit 1
    fi
    # Stale pid file from a daemon that died: dockerd refuses to start with it.
    log "removing stale $PIDFILE (pid ${oldpid:-?} not running)"
    rm -f "$PIDFILE"
fi

: >>"$LOG"
attempts=("${EXTRA_ARGS[*]}")
tried_iptables_fallback=0
tried_vfs_fallback=0
while ((${#attempts[@]})); do
    read -r -a args <<<"${attempts[0]}"
    attempts=("${attempts[@]:1}")
    log_start_line=$(($(wc -l <"$LOG") + 1))
    pid="$(start_dockerd "${args[@]}")"
    log "started dockerd (pid $pid${args[*]:+, args: ${args[*]}}), log: $LOG"
    rc=0
    wait_for_docker "$pid" "$DEADLINE_S" || rc=$?
    if ((rc == 0)); then
        log "docker engine is up: $(timeout 10 docker info --format \
            'server {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}, runtime {{.DefaultRuntime}}' 2>/dev/null || true)"
        exit 0
    fi
    if ((rc == 2)); then
        log "dockerd (pid $pid) did not answer within ${DEADLINE_S}s; stopping it"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do dockerd_pid_alive "$pid" || break; sleep 0.25; done
        if dockerd_pid_alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
        break
    fi
    # dockerd exited: look at the errors this attempt logged, pick a fallback.
    this_log="$(tail -n "+$log_start_line" "$LOG" 2>/dev/null |
        grep -iE 'level=(error|fatal)|failed to start daemon' || true)"
    rm -f "$PIDFILE" 2>/dev/null || true
    if ((!tried_iptables_fallback)) &&
        grep -qiE 'iptables|nat chain|ip6tables|xtables|nf_tables|netfilter' <<<"$this_log"; then
        tried_iptables_fallback=1
        log "dockerd died with an iptables/netfilter error; retrying with --iptables=false --ip-masq=false"
        attempts+=("${args[*]} --iptables=false --ip-masq=false")
        continue
    fi
    if ((!tried_vfs_fallback)) &&
        grep -qiE 'storage.driver|graphdriver|overlay' <<<"$this_log"; then
        tried_vfs_fallback=1
        log "dockerd died with a storage-driver error; retrying with --storage-driver=vfs"
        attempts+=("${args[*]} --storage-driver=vfs")
        continue
    fi
    break
done

log "docker engine did not come up; last log lines of $LOG:"
tail -n 40 "$LOG" >&2 || true
exit 1
