"""Epoch time of frozen-encoder training with and without the embedding cache, through the real training loop.

    python benchmarks/cached_epochs.py [--preset vit-b] [--images 4] [--epochs 3] [--max-instances 16]
        [--paths device cpu] [--threads N] [--json out.json]
    python benchmarks/cached_epochs.py --quick --json out.json   # tiny model, 2 small images, 2 epochs: the tests

A random model of the preset's architecture, synthetic COCO images with a long side of 600-1024 px (96-160 with
--quick), the decoder-only method, batch 2, no validation split; the uncached run first, in the same process (it
also pays the process's warm-up). Rows: one per run (embeddings recomputed, embeddings cached), with each epoch's
wall time from the run's results.json (``epoch_ms``, the training loop's monotonic clock around the epoch) and,
as every benchmark reports (benchmarks/common.py), median and p90 in ms: ``epoch_*`` over all epochs,
``later_epoch_*`` over the epochs after the first (the cache is filled in the first). A cached row adds
``speedup_after_first``: the recomputed run's median epoch over the cached run's median later epoch.

The floor: ``decoder`` times the decoder's own forward + backward on every batch of the later epochs (the same
images, instances and prompts, the features computed beforehand, no data loading, no optimizer step), and each
cached row's ``vs_decoder`` is its median later epoch over that: what the rest of a cached epoch (loading,
targets, the optimizer, logging) costs on top. ``--paths``: one cached run per data path (``data.normalize_on``:
``device`` reads no image whose embedding is cached; ``cpu``, the processor's path, decodes and normalises every
image every epoch), side by side in one process.
--device must be where the training loop runs (it takes CUDA when present).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import common
import torch

from samtune.config import load_config
from samtune.data.coco import CocoInstanceDataset
from samtune.data.dataset import SamPromptDataset, make_loader
from samtune.data.geometry import normalize_on_device
from samtune.embedding_cache import projects
from samtune.evaluation import sam_forward
from samtune.losses import InstanceLoss, batch_loss
from samtune.models.architectures import PRESETS, preset_config, save_random_sam
from samtune.models.family import image_features
from samtune.models.loading import build_model
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.train import train


def settings(model: Path, annotations: Path, images: Path, out: Path, cached: bool, path: str, args):
    """The runs' config: decoder-only, batch 2, no validation."""
    return load_config(
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
            "data.normalize_on": path,
            "output_dir": str(out),
        }
    )


def run(model: Path, annotations: Path, images: Path, out: Path, cached: bool, path: str, args) -> list[float]:
    """One decoder-only training run; its epochs' wall times in seconds."""
    train(settings(model, annotations, images, out, cached, path, args))
    return json.loads((out / "results.json").read_text())["epoch_seconds"]


def decoder_seconds(model: Path, annotations: Path, images: Path, tmp: Path, args) -> list[float]:
    """Per later epoch: the decoder's forward + backward summed over the epoch's batches, nothing else timed."""
    config = settings(model, annotations, images, tmp / "floor", True, "device", args)
    net, processor = build_model(config.model, config.peft)
    net.to(args.device).train()
    dataset = SamPromptDataset(CocoInstanceDataset(annotations, images), processor, config.data, seed=config.train.seed)
    loss_fn = InstanceLoss(config.train.dice_weight, config.train.focal_weight, config.train.iou_weight)
    timer, features, seconds = common.Timer(args.device), {}, []
    for epoch in range(1, args.epochs):
        dataset.set_epoch(epoch)
        total = 0.0
        for batch in make_loader(dataset, config.train.batch_size, seed=config.train.seed):
            batch = normalize_on_device({k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()})
            ids = [int(i) for i in batch["image_id"]]
            with torch.no_grad():
                for row, image_id in enumerate(ids):
                    if image_id not in features:
                        pixels = batch["pixel_values"][row : row + 1]
                        features[image_id] = image_features(net, pixels, project=projects(net))
            given = {name: torch.cat([features[i][name] for i in ids]) for name in features[ids[0]]}

            def step(batch=batch, given=given) -> None:
                batch_loss(sam_forward(net, batch, features=given), batch, loss_fn)["loss"].backward()

            total += timer(step)
            net.zero_grad(set_to_none=True)
        seconds.append(total)
    return seconds


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
    parser.add_argument(
        "--paths", nargs="+", default=["device", "cpu"], choices=["device", "cpu"], help="data.normalize_on per run"
    )
    args = common.parse(parser, argv, quick=QUICK)
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (the first epoch fills the cache)")
    loop_device = "cuda" if torch.cuda.is_available() else "cpu"  # what samtune.training's accelerator picks
    if args.device.type != loop_device:
        parser.error(f"--device {args.device}: the training loop runs on {loop_device} on this machine")
    epochs = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = save_random_sam(preset_config(args.preset), Path(tmp) / "model")
        spec = SyntheticSpec(
            num_images=args.images, min_side=args.min_side, max_side=args.max_side, max_shapes=6, empty_every=1000
        )
        annotations, images = make_synthetic_coco(Path(tmp) / "data", spec)
        # the uncached run first: it also pays the process's warm-up
        epochs["recomputed"] = run(model, annotations, images, Path(tmp) / "run-recomputed", False, "device", args)
        for path in args.paths:
            epochs[f"cached, {path}"] = run(model, annotations, images, Path(tmp) / f"run-{path}", True, path, args)
        floor = decoder_seconds(model, annotations, images, Path(tmp), args)
    recomputed = row("recomputed", epochs["recomputed"])
    decoder = {"embeddings": "decoder", "epochs": len(floor), "epoch_ms": [s * 1000 for s in floor]}
    decoder.update(common.timing("epoch", floor))
    rows = [recomputed]
    for path in args.paths:
        cached = row(f"cached, {path}", epochs[f"cached, {path}"])
        cached["speedup_after_first"] = recomputed["epoch_median_ms"] / cached["later_epoch_median_ms"]
        cached["first_vs_recomputed"] = cached["first_epoch_ms"] / recomputed["epoch_median_ms"]
        cached["vs_decoder"] = cached["later_epoch_median_ms"] / decoder["epoch_median_ms"]
        rows.append(cached)
    rows.append(decoder)
    print(
        f"{args.preset}, {args.images} images at up to {args.max_side} px, at most {args.max_instances} prompts per "
        f"image, decoder-only, {common.describe(args.device)}"
    )
    names = [r["embeddings"] for r in rows]
    print("| epoch | " + " | ".join(f"{name} ms" for name in names) + " |")
    print("|---:|" + "---:|" * len(names))
    columns = [r["epoch_ms"] for r in rows[:-1]] + [[None, *decoder["epoch_ms"]]]  # the floor: later epochs only
    for n, cells in enumerate(zip(*columns), start=1):
        print(f"| {n} | " + " | ".join("" if c is None else f"{c:.0f}" for c in cells) + " |")
    for cached in rows[1:-1]:
        print(
            f"{cached['embeddings']}: epochs after the first {cached['speedup_after_first']:.1f}x faster than "
            f"recomputed, {cached['vs_decoder']:.2f}x the decoder's own forward + backward (first epoch "
            f"{cached['first_vs_recomputed']:.2f}x an uncached epoch)"
        )
    print(f"({time.perf_counter() - started:.0f} s in all)")
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
