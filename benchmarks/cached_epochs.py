"""Epoch time of frozen-encoder training with and without the embedding cache, through the real training loop.

    python benchmarks/cached_epochs.py [--preset vit-b] [--images 4] [--epochs 3] [--max-instances 16]
        [--threads N] [--json out.json]
    python benchmarks/cached_epochs.py --quick --json out.json   # tiny model, 2 small images, 2 epochs: the tests

A random model of the preset's architecture, synthetic COCO images with a long side of 600-1024 px (96-160 with
--quick), the decoder-only method, batch 2, no validation split; the uncached run first, in the same process (it
also pays the process's warm-up). Rows: one per run (embeddings recomputed, embeddings cached), with each epoch's
wall time from the run's results.json (``epoch_ms``, the training loop's monotonic clock around the epoch) and,
as every benchmark reports (benchmarks/common.py), median and p90 in ms: ``epoch_*`` over all epochs,
``later_epoch_*`` over the epochs after the first (the cache is filled in the first). The cached row adds
``speedup_after_first``: the recomputed run's median epoch over the cached run's median later epoch.
--device must be where the training loop runs (it takes CUDA when present).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common
import torch

from samtune.config import load_config
from samtune.models.architectures import PRESETS, preset_config, save_random_sam
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.train import train


def run(model: Path, annotations: Path, images: Path, out: Path, cached: bool, args) -> list[float]:
    """One decoder-only training run; its epochs' wall times in seconds."""
    config = load_config(
        overrides={
            "model.name_or_path": str(model),
            "peft.method": "decoder",
            "data.train_annotations": str(annotations),
            "data.train_images": str(images),
            "data.num_workers": 0,
            "data.cache_embeddings": cached,
            "data.max_instances": args.max_instances,
            "train.epochs": args.epochs,
            "train.batch_size": 2,
            "train.log_images": 0,
            "output_dir": str(out),
        }
    )
    train(config)
    return json.loads((out / "results.json").read_text())["epoch_seconds"]


def row(name: str, seconds: list[float]) -> dict:
    return {
        "embeddings": name,
        "epochs": len(seconds),
        "epoch_ms": [s * 1000 for s in seconds],
        "first_epoch_ms": seconds[0] * 1000,
        **common.timing("epoch", seconds),
        **common.timing("later_epoch", seconds[1:]),
    }


QUICK = {"preset": "tiny", "images": 2, "epochs": 2, "min_side": 96, "max_side": 160}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(__file__, __doc__, quick="the tiny preset, 2 images of 96-160 px, 2 epochs per run")
    parser.add_argument("--preset", default="vit-b", choices=PRESETS)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run, at least 2")
    parser.add_argument("--max-instances", type=int, default=16, help="prompts per image and step")
    parser.add_argument("--min-side", type=int, default=600, help="shortest long side of the synthetic images")
    parser.add_argument("--max-side", type=int, default=1024, help="longest long side of the synthetic images")
    args = common.parse(parser, argv, quick=QUICK)
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (the first epoch fills the cache)")
    loop_device = "cuda" if torch.cuda.is_available() else "cpu"  # what samtune.training's accelerator picks
    if args.device.type != loop_device:
        parser.error(f"--device {args.device}: the training loop runs on {loop_device} on this machine")
    epochs = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_random_sam(preset_config(args.preset), Path(tmp) / "model")
        spec = SyntheticSpec(
            num_images=args.images, min_side=args.min_side, max_side=args.max_side, max_shapes=6, empty_every=1000
        )
        annotations, images = make_synthetic_coco(Path(tmp) / "data", spec)
        for cached in (False, True):  # the uncached run first: it also pays the process's warm-up
            name = "cached" if cached else "recomputed"
            epochs[name] = run(model, annotations, images, Path(tmp) / f"run-{name}", cached, args)
    recomputed, cached = row("recomputed", epochs["recomputed"]), row("cached", epochs["cached"])
    cached["speedup_after_first"] = recomputed["epoch_median_ms"] / cached["later_epoch_median_ms"]
    cached["first_vs_recomputed"] = cached["first_epoch_ms"] / recomputed["epoch_median_ms"]
    rows = [recomputed, cached]
    print(
        f"{args.preset}, {args.images} images at up to {args.max_side} px, at most {args.max_instances} prompts per "
        f"image, decoder-only, {common.describe(args.device)}"
    )
    print("| epoch | recomputed ms | cached ms |")
    print("|---:|---:|---:|")
    for n, (a, b) in enumerate(zip(recomputed["epoch_ms"], cached["epoch_ms"]), start=1):
        print(f"| {n} | {a:.0f} | {b:.0f} |")
    print(
        f"epochs after the first: {cached['speedup_after_first']:.1f}x faster with the cache (first epoch "
        f"{cached['first_epoch_ms']:.0f} ms, {cached['first_vs_recomputed']:.2f}x an uncached epoch)"
    )
    common.report(
        args,
        rows,
        model=f"{args.preset} architecture, random weights",
        method="decoder",
        images=args.images,
        image_sides=[args.min_side, args.max_side],
        max_instances=args.max_instances,
        batch_size=2,
    )
    return rows


if __name__ == "__main__":
    main()
