"""Tiled vs thumbnail inference on large images with small objects: box-prompted mIoU / mF1 and time per image.

    python benchmarks/tiled_inference.py [--side 4096] [--images 2] [--objects 40] [--tiles 128:64 256:64 512:128]
        [--model samtune/demo/base] [--threads N] [--json out.json]
    python benchmarks/tiled_inference.py --quick --json out.json   # 512 px, 1 image, 6 objects: the tests

The data set is generated (samtune.testing.large_images): ``side`` px images of the demo source domain's
background with ``objects`` flat shapes of its kinds, 20-60 px across, which the shipped demo base (input 256)
segments at their own scale. Rows, side by side in one process: ``thumbnail`` (samtune evaluate as it is: the
whole image resized to the model's input) and one per ``SIZE:OVERLAP`` (``evaluate --tile SIZE --overlap
OVERLAP``), each with mIoU / mF1 (fractions, at the original resolution), the windows encoded per image, the
encoder and decoder time per image (summed over its windows; the first image is warm-up when there are several),
and ``wall_per_image_ms``: the whole evaluation's wall time over the images (reading, scoring included).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common

from samtune.demo.bases import BASES
from samtune.evaluate import main as evaluate_main
from samtune.testing.large_images import LargeSpec, make_large_coco

QUICK = {"side": 512, "images": 1, "objects": 6, "tiles": ["128:64"]}


def tile_setting(value: str) -> tuple[int, int]:
    size, _, overlap = value.partition(":")
    return int(size), int(overlap or int(size) // 4)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(__file__, __doc__, quick="512 px, 1 image, 6 objects, 128 px tiles", threads=None)
    parser.add_argument("--model", default=str(BASES["sam"].folder), help="model folder (default: the demo base)")
    parser.add_argument("--side", type=int, default=4096, help="image side in pixels")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--objects", type=int, default=40, help="objects per image")
    parser.add_argument("--tiles", nargs="+", default=["128:64", "256:64", "512:128"], help="SIZE:OVERLAP each")
    parser.add_argument("--seed", type=int, default=0)
    args = common.parse(parser, argv, quick=QUICK)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = LargeSpec(num_images=args.images, side=args.side, objects=args.objects, seed=args.seed)
        annotations, images = make_large_coco(Path(tmp), spec)
        base = ["--model", args.model, "--annotations", str(annotations), "--images", str(images)]
        base += ["--device", str(args.device)]
        runs = {"thumbnail": []} | {
            f"tile {size} / {overlap}": ["--tile", str(size), "--overlap", str(overlap)]
            for size, overlap in map(tile_setting, args.tiles)
        }
        for name, extra in runs.items():
            start = time.perf_counter()
            result = evaluate_main([*base, *extra])
            seconds = time.perf_counter() - start
            latency = result["latency"]
            tiling = latency.get("tiling", {})
            rows.append(
                {
                    "inference": name,
                    "mIoU": result["mIoU"],
                    "mF1": result["mF1"],
                    "instances": result["num_instances"],
                    "windows_per_image": tiling.get("windows_per_image", {}).get("median", 1.0),
                    "encoder_median_ms": latency["image_encoder_ms"]["median"],
                    "encoder_p90_ms": latency["image_encoder_ms"]["p90"],
                    "decoder_median_ms": latency["decoder_ms"]["median"],
                    "decoder_p90_ms": latency["decoder_ms"]["p90"],
                    "wall_per_image_ms": 1000 * seconds / args.images,
                }
            )
    print(
        f"{args.images} images of {args.side} px, {args.objects} objects each, box prompts; "
        f"{common.describe(args.device)}"
    )
    print("| inference | mIoU % | mF1 % | windows / image | encoder ms / image | decoder ms / image | s / image |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['inference']} | {100 * row['mIoU']:.1f} | {100 * row['mF1']:.1f} | {row['windows_per_image']:.0f} "
            f"| {row['encoder_median_ms']:.0f} | {row['decoder_median_ms']:.0f} "
            f"| {row['wall_per_image_ms'] / 1000:.1f} |"
        )
    common.report(args, rows, model=args.model, side=args.side, images=args.images, objects=args.objects)
    return rows


if __name__ == "__main__":
    main()
