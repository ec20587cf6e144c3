"""Training-step throughput and peak memory per method, on a preset architecture (any family) with random weights.

    python benchmarks/train_throughput.py --preset vit-b --methods full decoder lora dora qlora qdora \\
        [--batch-size 2] [--instances 8] [--precision fp32 bf16] [--encoder plain fast] [--steps 10] \\
        [--warmup 2] [--threads N] [--device cuda] [--json out.json]
    python benchmarks/train_throughput.py --quick --json out.json  # tiny model, 3 steps: what the tests run

Each step is the training loop's own: the model from ``build_model`` (so qlora / qdora load a 4-bit base),
the loss from ``batch_loss``, backward, AdamW. Inputs are random tensors of the model's input size with
valid box prompts at the model's square input side (``prompt_encoder_config.image_size``: SAM / SAM-HQ pad to
it, SAM 2 / 3 resize to it), so data loading is not measured (see data_loading.py). --encoder plain is
transformers' own model, fast is samtune's fast image encoder (model.fast_encoder), on the same weights in the
same run; "vs plain" is the plain row's step time over this row's, for the same method and precision. The fast
encoder is SAM's ViT (SAM, SAM-HQ): on SAM 2 / 3 the fast rows are reported as skipped, not measured. Method hq
(SAM-HQ only) trains its HQ token and fusion modules alone. Timing, statistics,
memory and the JSON report are every benchmark's (benchmarks/common.py): each of --steps steps timed on its own
(CUDA events on a GPU, a monotonic clock on a CPU) after --warmup steps; step_median_ms and step_p90_ms;
images/s from the median. Peak memory in MiB: the CUDA allocator's peak, or on a CPU the process's peak
resident size during the row's timed steps (reset per row).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import common
import torch

from samtune.config import ModelConfig, PeftConfig
from samtune.data.batch import SamBatch
from samtune.evaluation import sam_forward
from samtune.losses import InstanceLoss, batch_loss
from samtune.models.architectures import PRESETS, preset_config, save_random_sam
from samtune.models.family import family_of
from samtune.models.loading import build_model

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ["full", "decoder", "lora", "dora", "qlora", "qdora"]
CHOICES = [*METHODS, "hq"]  # hq: SAM-HQ presets only


def random_batch(config, batch_size: int, instances: int, device: torch.device, seed: int = 0) -> SamBatch:
    """A training batch of random images and masks with valid box prompts, at the model's input size."""
    generator = torch.Generator().manual_seed(seed)
    prompt = config.prompt_encoder_config  # the square input side and patch of every family
    side = prompt.image_size
    mask = 4 * (side // prompt.patch_size)
    corners = torch.rand(batch_size, instances, 2, 2, generator=generator) * (side - 1)
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, side, side, generator=generator),
        "input_boxes": boxes,
        "low_res_masks": torch.rand(batch_size, instances, mask, mask, generator=generator) > 0.7,
        "low_res_ignore": torch.zeros(batch_size, mask, mask, dtype=torch.bool),
        "valid": torch.ones(batch_size, instances, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}  # type: ignore[return-value]


def measure(folder: Path, method: str, precision: str, encoder: str, args) -> dict:
    device = args.device
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
    common.reset_peak_memory(device)
    seconds = common.time_calls(step, repeats=args.steps, warmup=0, timer=common.Timer(device))
    peak = common.peak_memory_mib(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    times = common.timing("step", seconds)
    family = family_of(model)
    return {
        "preset": args.preset,
        "family": family.model_type,
        "fast_encoder_applies": family.fast_encoder,
        "method": method,
        "precision": precision,
        "encoder": encoder,
        "batch_size": args.batch_size,
        "instances": args.instances,
        "steps": args.steps,
        **times,
        "images_per_s": args.batch_size / (times["step_median_ms"] / 1000),
        "peak_memory_mib": peak,
        "peak_memory_kind": common.memory_kind(device),
        "trainable": sum(p.numel() for p in params),
    }


QUICK = {"preset": "tiny", "methods": ["decoder", "lora", "qdora"], "steps": 3, "warmup": 1, "instances": 3}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(
        __file__, __doc__, quick="the tiny preset, methods decoder lora qdora, 3 timed steps after 1 warm-up"
    )
    parser.add_argument(
        "--preset", default="vit-b", choices=PRESETS, metavar="NAME", help=f"one of {', '.join(PRESETS)}"
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=CHOICES, help="(default: all but hq)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--encoder", nargs="+", default=["plain", "fast"], choices=["plain", "fast"])
    parser.add_argument("--image-size", type=int, help="input size of the preset (default: its own, 1024 / SAM 3 1008)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--instances", type=int, default=8, help="box prompts (instances) per image")
    parser.add_argument("--targets", default="peft-sam")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    args = common.parse(parser, argv, quick=QUICK)
    device = args.device
    rows = []
    config = preset_config(args.preset, args.image_size)
    family = family_of(config)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_sam(config, Path(tmp) / args.preset)
        for method in args.methods:
            for precision in args.precision:
                for encoder in args.encoder:
                    if encoder == "fast" and not family.fast_encoder:
                        rows.append(
                            {
                                "preset": args.preset,
                                "family": family.model_type,
                                "method": method,
                                "precision": precision,
                                "encoder": encoder,
                                "fast_encoder_applies": False,
                                "skipped": f"fast encoder does not apply to {family.label} (SAM's ViT only)",
                            }
                        )
                        continue
                    try:
                        rows.append(measure(folder, method, precision, encoder, args))
                    except (RuntimeError, ValueError, ImportError) as error:  # e.g. out of memory: say so, go on
                        rows.append(
                            {
                                "preset": args.preset,
                                "family": family.model_type,
                                "method": method,
                                "precision": precision,
                                "encoder": encoder,
                                "error": f"{type(error).__name__}: {str(error)[:200]}",
                            }
                        )
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
    print(
        f"{args.preset}, batch {args.batch_size} x {args.instances} instances, {common.describe(device)}, "
        f"median (p90) of {args.steps} timed steps after {args.warmup} warm-up"
    )
    print("| method | precision | encoder | ms / step (p90) | vs plain | images/s | peak MiB | trainable |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    measured = [r for r in rows if "error" not in r and "skipped" not in r]
    plain = {(r["method"], r["precision"]): r for r in measured if r["encoder"] == "plain"}
    for r in rows:
        if "error" in r or "skipped" in r:
            print(f"| {r['method']} | {r['precision']} | {r['encoder']} | {r.get('error') or r['skipped']} | | | | |")
            continue
        base = plain.get((r["method"], r["precision"]))
        ratio = f"{base['step_median_ms'] / r['step_median_ms']:.2f}x" if base else ""
        print(
            f"| {r['method']} | {r['precision']} | {r['encoder']} | {r['step_median_ms']:.1f} "
            f"({r['step_p90_ms']:.1f}) | {ratio} | {r['images_per_s']:.2f} | {r['peak_memory_mib']:.0f} "
            f"| {r['trainable']:,} |"
        )
    assert all(math.isfinite(r.get("images_per_s", 1.0)) for r in rows)
    common.report(
        args,
        rows,
        model=f"{args.preset} architecture, random weights",
        family=family.model_type,
        fast_encoder_applies=family.fast_encoder,
        image_size=config.prompt_encoder_config.image_size,
        targets=args.targets,
        rank=args.rank,
        steps=args.steps,
        warmup=args.warmup,
    )
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
