#!/usr/bin/env bash
# Make a Docker engine and the rlm-sandbox images available on a Debian bookworm machine, as root,
# without an image registry. Idempotent and non-interactive; a second run takes a few seconds.
#
#   1. apt-get install docker.io and debootstrap if missing
#   2. start dockerd in the background if `docker info` fails (log: $DOCKERD_LOG)
#   3. build rlm-sandbox-base:bookworm (debootstrap + docker import) if missing
#   4. build rlm-sandbox:latest from images/Dockerfile on top of it (layer cache: ~1 s if unchanged)
#
# Environment: DOCKERD_LOG (default /var/log/rlm-sandbox-dockerd.log), DOCKERD_WAIT seconds
# (default 60), RLM_SANDBOX_BASE_IMAGE, RLM_SANDBOX_IMAGE, RLM_SANDBOX_CACHE_DIR, DEBIAN_MIRROR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/rlm-sandbox-dockerd.log}"
DOCKERD_WAIT="${DOCKERD_WAIT:-60}"
export RLM_SANDBOX_BASE_IMAGE="${RLM_SANDBOX_BASE_IMAGE:-rlm-sandbox-base:bookworm}"
export RLM_SANDBOX_IMAGE="${RLM_SANDBOX_IMAGE:-rlm-sandbox:latest}"

T0=$(date +%s.%N)
STEP_T=$T0
log() { printf '[docker-setup] %s\n' "$*" >&2; }
step_done() {  # step_done NAME: print how long the step took
    local now; now=$(date +%s.%N)
    log "$(awk -v a="$STEP_T" -v b="$now" -v n="$1" 'BEGIN { printf "%-28s %6.2f s", n, b - a }')"
    STEP_T=$now
}

if [[ $EUID -ne 0 ]]; then
    log "run as root (installs packages and starts dockerd)"
    exit 1
fi

# 1. Packages ---------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    # With recommends, as verified on these machines (apparmor, cgroupfs-mount, ...);
    # needrestart (a recommend) must only list, never ask or restart services.
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=l
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
step_done "packages"

# 2. Daemon ------------------------------------------------------------------------------------
alive() {  # alive PID: the process exists and is not a zombie (kill -0 succeeds on zombies)
    local state
    state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ -n $state && $state != Z ]]
}
dockerd_alive() {
    local pid
    for pid in $(pgrep -x dockerd 2>/dev/null); do
        alive "$pid" && return 0
    done
    return 1
}
start_dockerd() {
    # A dockerd or containerd that died leaves its pid file behind, and a new one then refuses to
    # start (or waits for the dead containerd).
    local pidfile pid
    for pidfile in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
        if [[ -f $pidfile ]]; then
            pid="$(cat "$pidfile" 2>/dev/null || true)"
            if [[ -z $pid ]] || ! alive "$pid"; then
                log "removing stale $pidfile"
                rm -f "$pidfile"
            fi
        fi
    done
    log "starting dockerd (log: $DOCKERD_LOG)"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    setsid dockerd --iptables=false --ip-masq=false --bridge=none \
        </dev/null >>"$DOCKERD_LOG" 2>&1 &
    STARTED_DOCKERD=1
}

STARTED_DOCKERD=0
if ! docker info >/dev/null 2>&1; then
    if dockerd_alive; then
        log "dockerd is running but not answering yet; waiting"
    else
        start_dockerd
    fi
    deadline=$(( $(date +%s) + DOCKERD_WAIT ))
    until docker info >/dev/null 2>&1; do
        if (( STARTED_DOCKERD == 0 )) && ! dockerd_alive; then
            start_dockerd  # the one we waited for has exited
        fi
        if (( $(date +%s) >= deadline )); then
            log "dockerd did not answer within ${DOCKERD_WAIT}s; last lines of $DOCKERD_LOG:"
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
fi
step_done "dockerd"

# 3. Offline base image --------------------------------------------------------------------------
"$ROOT/images/build-offline-base.sh"
step_done "base image"

# 4. Sandbox image -----------------------------------------------------------------------------
BASE="$RLM_SANDBOX_BASE_IMAGE" "$ROOT/images/build-sandbox-image.sh"
step_done "sandbox image"

log "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "ready in %.2f s", b - a }')"
