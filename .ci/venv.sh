#!/usr/bin/env bash
# Create (once) and print the cached virtualenv for this project.
#   bash .ci/venv.sh          ensure the venv exists and the package is installed into it
#   bash .ci/venv.sh --path   only print where it lives
# The venv lives in ${MYTHOS_VENV_ROOT:-~/.cache/mythos-jax}/venv-<hash of requirement files>.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
key=$(cat requirements.txt requirements-test.txt requirements-nodeps.txt .ci/venv.sh | sha256sum | cut -c1-16)
venv="${MYTHOS_VENV_ROOT:-$HOME/.cache/mythos-jax}/venv-$key"
if [[ "${1:-}" == "--path" ]]; then echo "$venv"; exit 0; fi

find_python312() {
  local candidate
  for candidate in python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    if [[ -x "$candidate" ]]; then echo "$candidate"; return 0; fi
  done
  echo "error: no Python >= 3.12 found (tried python3.12, python3.13, python3, pyenv versions)" >&2
  return 1
}

if [[ ! -f "$venv/.complete" ]]; then
  python=$(find_python312)
  echo "creating $venv with $python (first time only; torch makes this take several minutes)" >&2
  rm -rf "$venv"   # a half-built venv from an interrupted run
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q -U pip setuptools wheel >&2
  "$venv/bin/pip" install -q -r requirements-test.txt >&2
  "$venv/bin/pip" install -q --no-deps -r requirements-nodeps.txt >&2
  touch "$venv/.complete"
fi
# The package itself: editable, so the venv always runs this clone's code.
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2
echo "$venv"
