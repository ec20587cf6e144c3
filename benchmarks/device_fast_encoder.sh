#!/usr/bin/env bash
# The fast image encoder against plain SamModel on a lent GPU, CUDA events, side by side in one run per table
# (about 6 minutes on an H100). Results go to $OUT (default ./device-out); copy the tables into RESULTS.md
# with the card's name.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1  # for samtune; the benchmark scripts need no path of their own
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
for preset in vit-b slimsam-77; do
  timeout 150 python3 benchmarks/latency.py --device cuda --preset "$preset" --rounds 2 --repeats 10 --warmup 3 \
    --rows sdpa-fp32 sdpa-fp32-fast sdpa-bf16 sdpa-bf16-fast sdpa-bf16-compile sdpa-bf16-fast-compile \
    --json "$OUT/latency_$preset.json" > "$OUT/latency_$preset.txt" 2>&1
done
timeout 120 python3 benchmarks/train_throughput.py --device cuda --preset vit-b --methods lora full \
  --precision fp32 bf16 --encoder plain fast --batch-size 4 --instances 8 --steps 10 --warmup 3 \
  --json "$OUT/train_vit-b.json" > "$OUT/train_vit-b.txt" 2>&1
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_encoder.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest.txt"
