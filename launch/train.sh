#!/usr/bin/env bash
# Thin wrapper: train.sh [accelerate config] [experiment yaml] [--section.key value ...]
#   bash launch/train.sh launch/accelerate/1gpu.yaml launch/experiments/slimsam-lora.yaml --train.epochs 5
#   bash launch/train.sh   (the demo: samtune/demo/run.yaml on the CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
accel=${1:-launch/accelerate/cpu.yaml}
experiment=${2:-samtune/demo/run.yaml}
shift $(( $# > 2 ? 2 : $# ))
launcher=accelerate
[ -x .venv/bin/accelerate ] && launcher=.venv/bin/accelerate
exec "$launcher" launch --config_file "$accel" -m samtune.train --config "$experiment" "$@"
