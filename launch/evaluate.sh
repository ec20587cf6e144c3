#!/usr/bin/env bash
# Zero-shot against fine-tuned, on one split, in one table (metrics in %, latency per image).
#   bash launch/evaluate.sh BASE RUN_WEIGHTS ANNOTATIONS IMAGES [--prompt box] [--coco] [--output cmp.json]
# RUN_WEIGHTS is a run's best/ or final/: an adapter folder (lora, dora, ...) or a SamModel folder (full, decoder).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 4 ] || { sed -n '2,4p' "$0"; exit 2; }
base=$1 weights=$2 annotations=$3 images=$4
shift 4
samtune=samtune
[ -x .venv/bin/samtune ] && samtune=.venv/bin/samtune
if [ -f "$weights/adapter_config.json" ]; then
  exec "$samtune" evaluate --model "$base" --adapter "$weights" --compare-base \
    --annotations "$annotations" --images "$images" "$@"
fi
exec "$samtune" evaluate --model "$weights" --baseline "$base" --annotations "$annotations" \
  --images "$images" "$@"
