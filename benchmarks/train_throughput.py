"""Training-step throughput and peak memory per method, on a preset architecture with random weights.

    python benchmarks/train_throughput.py --preset vit-b --methods full decoder lora dora qlora qdora \
        [--batch-size 2] [--instances 8] [--precision fp32 bf16] [--encoder plain fast] [--steps 10] \
        [--threads N] [--json out.json]
    python benchmarks/train_throughput.py --quick      # tiny model, a few steps: what the tests run

Each step is the training loop's own: the model from ``build_model`` (so qlora / qdora load a 4-bit base),
the loss from ``batch_loss``, backward, AdamW. Inputs are random tensors of the model's input size with
valid box prompts, so data loading is not measured (see data_loading.py). --encoder plain is transformers'
SamModel, fast is samtune's fast image encoder (model.fast_encoder), on the same weights in the same run; "vs
plain" is the plain row's step time over this row's, for the same method and precision. Timing: CUDA events
around the timed steps after warm-up on a GPU; on a CPU a monotonic clock, stating the thread count.
Peak memory: the CUDA allocator's peak, or on a CPU the process's peak resident size during the row's timed
steps (reset per row, see cpu_memory.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import cpu_memory  # noqa: E402
from samtune.config import ModelConfig, PeftConfig  # noqa: E402
from samtune.evaluation import sam_forward  # noqa: E402
from samtune.losses import InstanceLoss, batch_loss  # noqa: E402
from samtune.modeling import build_model  # noqa: E402
from samtune.presets import PRESETS, save_random_preset  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_batch(config, batch_size: int, instances: int, device: torch.device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    side = config.vision_config.image_size
    mask = 4 * (side // config.vision_config.patch_size)
    corners = torch.rand(batch_size, instances, 2, 2, generator=generator) * (side - 1)
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, side, side, generator=generator),
        "input_boxes": boxes,
        "labels": torch.rand(batch_size, instances, mask, mask, generator=generator) > 0.7,
        "ignore": torch.zeros(batch_size, mask, mask, dtype=torch.bool),
        "valid": torch.ones(batch_size, instances, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}


def measure(folder: Path, method: str, precision: str, encoder: str, args, device: torch.device) -> dict:
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast is for GPUs")
    model, _ = build_model(
        ModelConfig(str(folder), fast_encoder=encoder == "fast"),
        PeftConfig(method=method, targets=args.targets, rank=args.rank),
    )
    if method not in ("qlora", "qdora"):  # quantised bases are placed at load time
        model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    batch = random_batch(model.config, args.batch_size, args.instances, device)
    loss_fn = InstanceLoss()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = DTYPES[precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = batch_loss(sam_forward(model, batch, multimask_output=False), batch, loss_fn)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cpu":
        cpu_memory.reset_peak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        begin = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = time.perf_counter() - begin
        peak = cpu_memory.peak_mib()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "preset": args.preset,
        "method": method,
        "precision": precision,
        "encoder": encoder,
        "batch_size": args.batch_size,
        "instances": args.instances,
        "steps": args.steps,
        "seconds_per_step": seconds / args.steps,
        "images_per_s": args.batch_size * args.steps / seconds,
        "peak_memory_mib": peak,
        "peak_memory_kind": "cuda allocator" if device.type == "cuda" else "process RSS during the timed steps",
        "trainable": sum(p.numel() for p in params),
        "device": describe(device),
    }


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-b", choices=PRESETS)
    parser.add_argument("--methods", nargs="+", default=["full", "decoder", "lora", "dora", "qlora", "qdora"])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--encoder", nargs="+", default=["plain", "fast"], choices=["plain", "fast"])
    parser.add_argument("--image-size", type=int, help="input size of the preset (default: its own, 1024)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--targets", default="peft-sam")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps: a smoke run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.warmup, args.batch_size, args.instances = "tiny", 2, 1, 2, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_preset(args.preset, Path(tmp) / args.preset, image_size=args.image_size)
        for method in args.methods:
            for precision in args.precision:
                for encoder in args.encoder:
                    try:
                        rows.append(measure(folder, method, precision, encoder, args, device))
                    except (RuntimeError, ValueError, ImportError) as error:  # e.g. out of memory: say so, go on
                        rows.append(
                            {
                                "preset": args.preset,
                                "method": method,
                                "precision": precision,
                                "encoder": encoder,
                                "error": f"{type(error).__name__}: {str(error)[:200]}",
                            }
                        )
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
    print(
        f"{args.preset}, batch {args.batch_size} x {args.instances} instances, {rows[0].get('device', '')}, "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    print("| method | precision | encoder | s / step | vs plain | images/s | peak MiB | trainable |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    plain = {(r["method"], r["precision"]): r for r in rows if r["encoder"] == "plain" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['precision']} | {r['encoder']} | {r['error']} | | | | |")
            continue
        base = plain.get((r["method"], r["precision"]))
        ratio = f"{base['seconds_per_step'] / r['seconds_per_step']:.2f}x" if base else ""
        print(
            f"| {r['method']} | {r['precision']} | {r['encoder']} | {r['seconds_per_step']:.3f} | {ratio} "
            f"| {r['images_per_s']:.2f} | {r['peak_memory_mib']:.0f} | {r['trainable']:,} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    assert all(math.isfinite(r.get("images_per_s", 1.0)) for r in rows)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
