#!/usr/bin/env bash
# What the app's browser test needs, on top of launch/setup.sh's .venv: the app extra's pinned packages
# (requirements-app.lock, the core pins as constraints) and Debian's chromium, which Playwright drives
# (Playwright cannot download its own browsers here). Idempotent: returns at once when both are in place.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
stamp=.venv/.samtune-app-installed
hash_cmd="sha256sum"
command -v sha256sum >/dev/null 2>&1 || hash_cmd="shasum -a 256"  # macOS
want=$(cat requirements.lock requirements-app.lock launch/setup_app.sh | $hash_cmd | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -r requirements-app.lock
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
fi
if ! command -v chromium >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_app.sh: no chromium, and no apt-get to install it: install Chromium, then set SAMTUNE_CHROMIUM" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup_app.sh: installing chromium needs root or sudo" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
