"""Data-loading rate: images/s from COCO files to padded SAM batches, with 0 and N DataLoader workers.

    python benchmarks/data_loading.py [--images 48] [--side 1024] [--workers 0 2] [--json out.json]

Synthetic COCO images (long side around ``--side``, varied aspect ratios and modes) go through
the real pipeline: checked COCO index, decoding, prompts, SamProcessor at ``--side`` input,
collation. Wall-clock time of a full pass, after one warm-up pass, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from samtune.data import CocoInstanceDataset, SamPromptDataset, make_loader  # noqa: E402
from samtune.prompts import PromptConfig  # noqa: E402
from samtune.synthetic import SyntheticSpec, make_synthetic_coco  # noqa: E402
from samtune.tiny import processor_for, tiny_sam_config  # noqa: E402


def one_pass(loader) -> int:
    images = 0
    for batch in loader:
        images += batch["pixel_values"].shape[0]
    return images


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--side", type=int, default=1024, help="model input size (longest edge)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt", default="box")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # like a DataLoader worker; the main process gets no more
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = SyntheticSpec(num_images=args.images, min_side=args.side // 2, max_side=args.side, max_shapes=6)
        annotations, image_dir = make_synthetic_coco(tmp, spec)
        start = time.perf_counter()
        source = CocoInstanceDataset(annotations, image_dir)
        open_s = time.perf_counter() - start
        processor = processor_for(tiny_sam_config(image_size=args.side))
        dataset = SamPromptDataset(source, processor, PromptConfig(mode=args.prompt), max_instances=16, train=True)
        for workers in args.workers:
            loader = make_loader(dataset, args.batch_size, num_workers=workers)
            one_pass(loader)  # warm-up: file cache, worker start-up code paths
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                images = one_pass(loader)
                best = min(best, time.perf_counter() - start)
            rows.append(
                {
                    "workers": workers,
                    "images": images,
                    "seconds": best,
                    "images_per_s": images / best,
                    "input_side": args.side,
                    "prompt": args.prompt,
                    "open_s": open_s,
                    "cpus": os.cpu_count(),
                }
            )
    print(f"| workers | images/s | s per pass ({rows[0]['images']} images) |")
    print("|---:|---:|---:|")
    for row in rows:
        print(f"| {row['workers']} | {row['images_per_s']:.1f} | {row['seconds']:.2f} |")
    print(f"opening (index + header checks of {args.images} images): {open_s * 1000:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
