#!/usr/bin/env bash
# The GPU rows, as one prepared script for a lent GPU machine (about 11 minutes on an H100 / H200): the fast
# encoder against plain SamModel, the training step of every method in bf16 (4-bit ones with bitsandbytes from
# .whl/), the families' latency, the data path against the step rate, cached epochs against the decoder's floor,
# the decoder by prompt count, FSDP with 2 processes when there are 2 GPUs, and the suite on the GPU path.
# Results go to $OUT (default ./device-out), one .txt (the printed table, "rc=N" last) and one .json per step;
# copy the tables into benchmarks/RESULTS.md with the card's name and versions (env.txt).
#
#   bash benchmarks/device_check.sh              # on the GPU machine
#   QUICK=1 bash benchmarks/device_check.sh      # every step with --quick on this CPU: the plumbing, in minutes
#
# The wheels it installs from .whl/ (that machine has torch, transformers, accelerate, PEFT; Python 3.12), made
# here with: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
#   $(grep -E '^(bitsandbytes|pycocotools|monai|tqdm|scipy)==' requirements.lock)
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # pycocotools, monai, bitsandbytes: the GPU machine reaches no registry
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD  # samtune is not installed there; the benchmark scripts need no path of their own
fi
export PYTHONUNBUFFERED=1 SAMTUNE_CACHE=/tmp/samtune-cache
python=${PYTHON:-python3}
if [ "${QUICK:-0}" = 1 ]; then device=cpu; quick=(--quick); else device=cuda; quick=(); fi

# step NAME SECONDS COMMAND...: run it under a time limit, its output and exit status in $OUT/NAME.txt
step() {
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "rc=$?" >> "$OUT/$name.txt"
}
bench() {  # bench NAME SECONDS SCRIPT ARGS...: a benchmark on $device, JSON beside the table
  local name=$1 limit=$2 script=$3
  shift 3
  step "$name" "$limit" "$python" "benchmarks/$script.py" --device "$device" "${quick[@]}" "$@" --json "$OUT/$name.json"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$python" -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  "$python" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
  "$python" -c "import os; print('cpus', os.cpu_count())"
} > "$OUT/env.txt" 2>&1
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

# 1. The fast encoder against plain SamModel, CUDA events, fp32 and bf16 (target >= 1.5x in bf16), ViT-B and
#    SlimSAM-77 side by side in one run.
if [ ${#quick[@]} -eq 0 ]; then presets=(--preset vit-b slimsam-77); else presets=(); fi
bench latency_fast_encoder 150 latency "${presets[@]}" --rows sdpa-fp32 sdpa-fp32-fast sdpa-bf16 sdpa-bf16-fast \
  --parts encoder --rounds 2 --repeats 10 --warmup 3

# 2. The training step of every method in bf16, ViT-B (qlora / qdora need bitsandbytes from .whl/).
if [ ${#quick[@]} -eq 0 ]; then sizes=(--preset vit-b --batch-size 4 --instances 8 --steps 10 --warmup 3); else sizes=(); fi
bench train_methods 200 train_throughput "${sizes[@]}" --methods full decoder lora dora qlora qdora \
  --precision bf16 --encoder plain

# 3. The families' latency rows, bf16, side by side.
if [ ${#quick[@]} -eq 0 ]; then presets=(--preset vit-b sam-hq-vit-b sam2.1-hiera-t sam2.1-hiera-b+ sam3-tracker); else presets=(); fi
bench latency_families 150 latency "${presets[@]}" --rows sdpa-bf16 --repeats 10 --warmup 3

# 4. The data path: images/s on both paths with this machine's workers, beside the decoder-only step rate of
#    row 2 (train_methods.json); cached epochs against the decoder's own forward + backward; the decoder by
#    prompt count.
if [ ${#quick[@]} -eq 0 ]; then loading=(--images 48 --workers 0 4 8); else loading=(); fi
step data_loading 150 "$python" benchmarks/data_loading.py "${quick[@]}" "${loading[@]}" --json "$OUT/data_loading.json"
if [ ${#quick[@]} -eq 0 ]; then cached=(--images 8 --max-instances 2); else cached=(--threads 1); fi
bench cached_epochs 150 cached_epochs "${cached[@]}"
bench decoder_prompts 60 decoder_prompts

# 5. FSDP with 2 processes (only with 2 GPUs), LoRA on all linear layers.
if [ "$gpus" -ge 2 ]; then
  step fsdp_2 150 accelerate launch --config_file launch/accelerate/fsdp.yaml --num_processes 2 samtune/train.py \
    --output_dir /tmp/run-fsdp --peft.method lora --peft.targets all-linear --train.max_steps 10
else
  echo "skipped: $gpus GPU(s); FSDP with 2 processes needs 2" > "$OUT/fsdp_2.txt"
fi

# 6. The suite on the GPU path, last (what is left of the budget): not the 2-process test (one GPU).
if [ ${#quick[@]} -eq 0 ]; then
  step pytest 120 "$python" -m pytest -q -x -p no:cacheprovider tests -k "not two_process"
fi
