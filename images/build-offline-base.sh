#!/usr/bin/env bash
# Build the offline base image rlm-sandbox-base:bookworm (Debian bookworm + python3) without any
# image registry: debootstrap a minimal root file system from Debian's package archive and
# `docker import` it. Skips all work when the image already exists (set FORCE=1 to rebuild).
#
# Environment:
#   RLM_SANDBOX_BASE_IMAGE  image name to create            (default rlm-sandbox-base:bookworm)
#   DEBIAN_MIRROR           archive debootstrap fetches from (default http://deb.debian.org/debian)
#   RLM_SANDBOX_CACHE_DIR   if set, keep/reuse the root file system tarball there (for CI caches)
#   FORCE=1                 rebuild even if the image exists
# Needs root (debootstrap), a running Docker engine and debootstrap (installed with apt if missing).
set -euo pipefail

IMAGE="${RLM_SANDBOX_BASE_IMAGE:-rlm-sandbox-base:bookworm}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE_DIR="${RLM_SANDBOX_CACHE_DIR:-}"
TARBALL="${CACHE_DIR:+$CACHE_DIR/rlm-sandbox-base-$SUITE.tar}"

log() { printf '[build-offline-base] %s\n' "$*" >&2; }

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE exists, nothing to do"
    exit 0
fi

import_tar() {  # import_tar SOURCE (a file, or - for stdin)
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --message "debootstrap --variant=minbase $SUITE + python3" \
        "$1" "$IMAGE" >/dev/null
}

if [[ -n "$TARBALL" && -s "$TARBALL" && "${FORCE:-0}" != 1 ]]; then
    log "importing cached root file system $TARBALL"
    import_tar "$TARBALL"
    log "built $IMAGE from the cache"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    log "debootstrap needs root"
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

ROOTFS="$(mktemp -d /var/tmp/rlm-sandbox-rootfs.XXXXXX)"
cleanup() { rm -rf --one-file-system "$ROOTFS" "$ROOTFS.log"; }
trap cleanup EXIT

log "debootstrap $SUITE into $ROOTFS from $MIRROR"
debootstrap --variant=minbase --include=python3-minimal,python3 "$SUITE" "$ROOTFS" "$MIRROR" \
    >"$ROOTFS.log" 2>&1 || { tail -n 30 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"

# Slim down: package caches, lists, docs. python3 and the stdlib stay whole.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* \
       "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log "$ROOTFS"/var/log/apt/*
"$ROOTFS"/usr/bin/python3 --version >/dev/null  # sanity: the interpreter runs

if [[ -n "$TARBALL" ]]; then
    mkdir -p "$CACHE_DIR"
    tar --numeric-owner -C "$ROOTFS" -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
    import_tar "$TARBALL"
else
    tar --numeric-owner -C "$ROOTFS" -c . | import_tar -
fi
log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
