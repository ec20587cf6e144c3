#!/usr/bin/env bash
# Regenerate requirements-app.lock: the `app` extra (pyproject.toml) resolved against requirements.lock as
# constraints, so the core pins never move. Resolves only (pip's dry run, in a scratch venv): nothing installs.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
# the extra's requirements, as pyproject.toml lists them
python3 - > "$scratch/app.txt" <<'PY'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["app"]))
PY
"$scratch/venv/bin/pip" install --quiet --disable-pip-version-check --dry-run --ignore-installed \
  --report "$scratch/report.json" -c requirements.lock -r "$scratch/app.txt"
{
  echo "# The app extra's versions, resolved with requirements.lock as constraints. Regenerate: bash launch/lock_app.sh"
  python3 - "$scratch/report.json" <<'PY'
import json, sys
for item in sorted(json.load(open(sys.argv[1]))["install"], key=lambda i: i["metadata"]["name"].lower()):
    print(f'{item["metadata"]["name"]}=={item["metadata"]["version"]}')
PY
} > requirements-app.lock
echo "wrote requirements-app.lock ($(grep -vc '^#' requirements-app.lock) packages)"
