#!/usr/bin/env bash
# Regenerate requirements.lock: resolve pyproject.toml (with the dev and onnx extras) in a scratch venv and pin the result.
# torch is pinned without its local build tag (+cpu), so GPU machines get the same release from PyPI.
# segment-anything-hq and sam2 (test references, which declare torchvision) are pinned in setup.sh, not here.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}" -e '.[dev,onnx]'
{
  echo "# Exact versions samtune is tested with. Regenerate with: bash launch/lock.sh"
  "$scratch/venv/bin/pip" freeze --exclude-editable --disable-pip-version-check | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
