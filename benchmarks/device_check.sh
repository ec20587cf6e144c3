#!/usr/bin/env bash
# GPU checks and measurements, as run on a lent GPU machine (PyTorch, transformers, PEFT, accelerate present;
# pycocotools, monai and segment-anything carried as wheels in .whl/). Results go to $OUT (default ./device-out).
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD  # samtune is not installed there; the benchmark scripts need no path of their own
fi
export PYTHONUNBUFFERED=1 SAMTUNE_CACHE=/tmp/samtune-cache
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  python3 -c "import bitsandbytes" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1

# 1. The test suite on the GPU path (the training loop picks CUDA when present). Not here: the 2-process DDP
#    test (one GPU), 4-bit tests (bitsandbytes absent on this machine).
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests \
  -k "not two_process and not quantised and not qlora and not qdora" > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest.txt"

# 2. Training-step throughput and peak memory, SAM ViT-B and SlimSAM-77 architectures, 1024 input. JSON:
#    {"meta", "rows"}, step_median_ms / step_p90_ms, peak_memory_mib (benchmarks/RESULTS.md, top).
for preset in vit-b slimsam-77; do
  timeout 150 python3 benchmarks/train_throughput.py --device cuda --preset "$preset" --methods full decoder \
    lora dora --precision fp32 bf16 --batch-size 4 --instances 8 --steps 10 --warmup 3 \
    --json "$OUT/train_$preset.json" > "$OUT/train_$preset.txt" 2>&1
done

# 3. The training script under accelerate on one GPU (bf16) and under the FSDP config (one process).
timeout 120 accelerate launch --config_file launch/accelerate/1gpu.yaml samtune/train.py \
  --output_dir /tmp/run-1gpu --train.max_steps 30 --train.eval_every 10 --train.save_every 10 \
  > "$OUT/run_1gpu.txt" 2>&1
echo "rc=$?" >> "$OUT/run_1gpu.txt"
timeout 120 accelerate launch --config_file launch/accelerate/fsdp.yaml --num_processes 1 samtune/train.py \
  --output_dir /tmp/run-fsdp --peft.method lora --peft.targets all-linear --train.max_steps 10 \
  > "$OUT/run_fsdp.txt" 2>&1
echo "rc=$?" >> "$OUT/run_fsdp.txt"
ls -R /tmp/run-1gpu /tmp/run-fsdp > "$OUT/run_folders.txt" 2>&1
