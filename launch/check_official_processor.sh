#!/usr/bin/env bash
# SAM 2 / 3's image processor: samtune's torch implementation (samtune/models/square_processor.py) against
# transformers' official one, which needs torchvision. torchvision does not import beside .venv's CPU torch, so
# this runs tests/test_square_processor.py in a separate venv where it does (torch 2.14.1 + torchvision 0.29.1:
# the pair that imports on a CPU-only x86_64 machine; pip takes both from this machine's disk, about 5.5 GB).
# There no test of that file may skip. CI runs it after the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TORCHVISION_VENV:-.venv-torchvision}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  torch==2.14.1 torchvision==0.29.1 "$(grep '^transformers==' requirements.lock)" \
  "$(grep '^pytest==' requirements.lock)" "$(grep '^numpy==' requirements.lock)" \
  "$(grep '^pillow==' requirements.lock)" "$(grep '^safetensors==' requirements.lock)"
SAMTUNE_REQUIRE_OFFICIAL_PROCESSOR=1 PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  --noconftest -o addopts="" tests/test_square_processor.py
