# Sourced by scripts/test and scripts/demo: a project virtualenv with everything installed.
# Re-installs only when a pyproject file changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.rlm-sandbox-installed"
want="$(cat pyproject.toml backends/*/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "scripts: installing rlm-sandbox and its backends into .venv ..." >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  args=(-e ".[dev,rlm]")
  for b in backends/*/; do
    [ -f "$b/pyproject.toml" ] && args+=(-e "$b")
  done
  "$VENV/bin/python" -m pip install -q "${args[@]}" >&2
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
