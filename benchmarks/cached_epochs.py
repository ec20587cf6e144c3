"""Epoch time of frozen-encoder training with and without the embedding cache, through the real training loop.

    python benchmarks/cached_epochs.py [--preset vit-b] [--images 4] [--epochs 3] [--json out.json]

A random model of the preset's architecture, synthetic COCO images with a long side of 600-1024 px, the
decoder-only method, batch 2, no validation split. Epoch times come from the run's results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from samtune.presets import PRESETS, save_random_preset  # noqa: E402
from samtune.synthetic import SyntheticSpec, make_synthetic_coco  # noqa: E402
from samtune.train import main as train  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-b", choices=PRESETS)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-instances", type=int, default=16, help="prompts per image and step")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_random_preset(args.preset, Path(tmp) / "model")
        spec = SyntheticSpec(num_images=args.images, min_side=600, max_side=1024, max_shapes=6, empty_every=1000)
        annotations, images = make_synthetic_coco(Path(tmp) / "data", spec)
        for cached in (False, True):  # the uncached run first: it also pays the process's warm-up
            out = Path(tmp) / f"run-{cached}"
            train(
                [
                    "--model.name_or_path",
                    str(model),
                    "--peft.method",
                    "decoder",
                    "--data.train_annotations",
                    str(annotations),
                    "--data.train_images",
                    str(images),
                    "--data.num_workers",
                    "0",
                    "--data.cache_embeddings",
                    str(cached).lower(),
                    "--data.max_instances",
                    str(args.max_instances),
                    "--train.epochs",
                    str(args.epochs),
                    "--train.batch_size",
                    "2",
                    "--train.log_images",
                    "0",
                    "--output_dir",
                    str(out),
                ]
            )
            rows["cached" if cached else "recomputed"] = json.loads((out / "results.json").read_text())["epoch_seconds"]
    first, later = rows["cached"][0], sum(rows["cached"][1:]) / (args.epochs - 1)
    plain = sum(rows["recomputed"]) / len(rows["recomputed"])
    result = {
        "preset": args.preset,
        "images": args.images,
        "max_instances": args.max_instances,
        "threads": torch.get_num_threads(),
        "epoch_seconds": rows,
        "first_epoch_cached_s": first,
        "later_epoch_cached_s": later,
        "epoch_recomputed_s": plain,
        "speedup_after_first": plain / later,
    }
    print(
        f"{args.preset}, {args.images} images at up to 1024 px, at most {args.max_instances} prompts per image, "
        f"decoder-only, {torch.get_num_threads()} threads"
    )
    print("| epoch | recomputed s | cached s |")
    print("|---:|---:|---:|")
    for n, (a, b) in enumerate(zip(rows["recomputed"], rows["cached"]), start=1):
        print(f"| {n} | {a:.2f} | {b:.2f} |")
    print(
        f"epochs after the first: {plain / later:.0f}x faster with the cache (first epoch {first:.1f} s, "
        f"{first / plain:.2f}x an uncached epoch)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
