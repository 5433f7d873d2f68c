#!/usr/bin/env bash
# Build the sandbox image (default rlm-sandbox:latest) from images/Dockerfile with a minimal build
# context: only rlm_sandbox/runtime.py is sent to the engine, not the whole repository. Uses the
# engine's layer cache, so a rebuild with nothing changed takes about a second and a changed
# runtime is always picked up.
#
# Environment:
#   RLM_SANDBOX_IMAGE  tag to build        (default rlm-sandbox:latest)
#   BASE               base image build arg (default python:3.12-slim; CI: rlm-sandbox-base:bookworm)
# If rlm_sandbox/runtime.py does not exist yet, a placeholder is baked in (with a warning).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${RLM_SANDBOX_IMAGE:-rlm-sandbox:latest}"
BASE="${BASE:-python:3.12-slim}"

log() { printf '[build-sandbox-image] %s\n' "$*" >&2; }

CONTEXT="$(mktemp -d)"
trap 'rm -rf "$CONTEXT"' EXIT
mkdir -p "$CONTEXT/rlm_sandbox"
if [[ -f "$ROOT/rlm_sandbox/runtime.py" ]]; then
    cp "$ROOT/rlm_sandbox/runtime.py" "$CONTEXT/rlm_sandbox/runtime.py"
else
    log "WARNING: $ROOT/rlm_sandbox/runtime.py does not exist; baking in a placeholder"
    printf '# placeholder: rlm_sandbox/runtime.py did not exist when this image was built\n' \
        >"$CONTEXT/rlm_sandbox/runtime.py"
fi
# Keep the file's mtime fixed so the COPY layer is cached when the content is unchanged.
touch -d '2000-01-01 00:00:00 UTC' "$CONTEXT/rlm_sandbox/runtime.py"
SHA="$(sha256sum "$CONTEXT/rlm_sandbox/runtime.py" | cut -d' ' -f1)"

# The classic builder works with every engine version and needs no buildx plugin; its output
# (including newer clients' deprecation notice) is shown only when the build fails.
if ! DOCKER_BUILDKIT=0 docker build \
        -f "$ROOT/images/Dockerfile" \
        --build-arg "BASE=$BASE" \
        --build-arg "RUNTIME_SHA256=$SHA" \
        -t "$IMAGE" \
        "$CONTEXT" >"$CONTEXT.log" 2>&1; then
    cat "$CONTEXT.log" >&2
    rm -f "$CONTEXT.log"
    exit 1
fi
rm -f "$CONTEXT.log"
# Earlier builds of this image that lost their tag (a runtime change) are only clutter.
docker image prune -f --filter dangling=true --filter label=org.rlm-sandbox.runtime-sha256 >/dev/null
log "built $IMAGE from $BASE (runtime sha256 ${SHA:0:12})"
