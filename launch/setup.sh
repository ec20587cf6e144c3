#!/usr/bin/env bash
# Create .venv and install samtune with the locked dependency versions.
# Idempotent: a second run returns at once unless requirements.lock, pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.samtune-installed
hash_cmd="sha256sum"
command -v sha256sum >/dev/null 2>&1 || hash_cmd="shasum -a 256"  # macOS
want=$(cat requirements.lock pyproject.toml launch/setup.sh | $hash_cmd | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  .venv/bin/python -m pip check
  # Dev only: the official SAM-HQ and SAM 2 code that tests/test_original_checkpoints.py checks samtune's
  # conversions against. Both packages declare torchvision (sam2 also hydra-core), which must not be installed
  # here (it fails to import with this torch, and then transformers' processors break), and their modeling code
  # needs neither. So they go in without dependencies, with iopath and its portalocker (all that sam2's modeling
  # code imports beyond this environment), into a folder off the import path: pip check above never sees their
  # unmet declarations, samtune cannot import them by accident, and that test adds the folder itself.
  # --no-build-isolation: the sdists (sam2, iopath) build with this environment's setuptools and torch instead
  # of fetching another torch; SAM2_BUILD_CUDA=0 skips sam2's optional CUDA extension (video post-processing).
  rm -rf .venv/reference
  SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --target .venv/reference \
    segment-anything-hq==0.3 sam2==1.1.0 iopath==0.1.10 portalocker==4.4.2
  echo "$want" > "$stamp"
fi
