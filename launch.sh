#!/usr/bin/env bash
# launch.sh CONFIG [-- args for the training script]   run the config's training script
# launch.sh --tests [pytest args]                       run the test suite
# Works on a machine with only python3: missing dependencies go into a local .venv.
set -euo pipefail
KIT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

ensure_python() {  # sets PY; $1 = extra packages the caller needs (e.g. pytest)
  local need="import torch, numpy, yaml, tqdm${1:+, $1}"
  if [ -x "$KIT_DIR/.venv/bin/python" ] && "$KIT_DIR/.venv/bin/python" -c "$need" 2>/dev/null; then
    PY="$KIT_DIR/.venv/bin/python"; return
  fi
  if python3 -c "$need" 2>/dev/null; then PY=python3; return; fi
  echo "launch.sh: installing requirements into $KIT_DIR/.venv" >&2
  # --system-site-packages: a torch already on the machine is reused instead of downloaded again
  [ -x "$KIT_DIR/.venv/bin/python" ] || python3 -m venv --system-site-packages "$KIT_DIR/.venv"
  "$KIT_DIR/.venv/bin/python" -m pip install --quiet -r "$KIT_DIR/requirements.txt" ${1:+$1}
  PY="$KIT_DIR/.venv/bin/python"
}

if [ "${1:-}" = "--tests" ]; then
  shift
  ensure_python pytest
  cd "$KIT_DIR"
  exec "$PY" -m pytest -q "$@"
fi

CONFIG="${1:?usage: launch.sh CONFIG [-- script args] | launch.sh --tests}"
shift
[ "${1:-}" = "--" ] && shift
[ -f "$CONFIG" ] || { echo "launch.sh: config $CONFIG not found" >&2; exit 2; }
ensure_python
TASK=$("$PY" -c "import sys, yaml; print((yaml.safe_load(open(sys.argv[1])) or {}).get('task', 'probe'))" "$CONFIG" 2>/dev/null) \
  || { echo "launch.sh: $CONFIG is not valid YAML" >&2; exit 2; }
SCRIPT="$KIT_DIR/train_$TASK.py"
[ -f "$SCRIPT" ] || { echo "launch.sh: task '$TASK' in $CONFIG has no script train_$TASK.py" >&2; exit 2; }
exec "$PY" "$SCRIPT" --config "$CONFIG" "$@"
