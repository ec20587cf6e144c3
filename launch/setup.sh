#!/usr/bin/env bash
# Create .venv and install samtune with the locked dependency versions.
# Idempotent: a second run returns at once unless requirements.lock or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.samtune-installed
hash_cmd="sha256sum"
command -v sha256sum >/dev/null 2>&1 || hash_cmd="shasum -a 256"  # macOS
want=$(cat requirements.lock pyproject.toml | $hash_cmd | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
fi
