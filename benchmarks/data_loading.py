"""Data-loading rate: images/s from COCO files to padded SAM batches, on both data paths, with 0 and N workers.

    python benchmarks/data_loading.py [--images 48] [--side 1024] [--family sam|sam2] [--workers 0 2]
        [--batch-size 4] [--repeats 3] [--prompt box] [--threads 1] [--json out.json]
    python benchmarks/data_loading.py --quick --json out.json   # 6 small images, no workers: what the tests run

Synthetic COCO images (long side between half ``--side`` and ``--side``, varied aspect ratios and modes) go
through the real pipeline: checked COCO index, decoding, prompts, then either path of ``data.normalize_on``:
``cpu``, the processor resizes, rescales, normalises and pads in float32 in the loader (the path before the uint8
one); ``device``, the loader resizes in uint8 and pads (``samtune.data.geometry``) and the device normalises. Rows
interleave the paths for each worker count, so each ratio is measured side by side: ``speedup`` is the row's
images/s over the ``cpu`` path's at the same worker count. A third row, ``device+normalise``, also normalises each
batch in this process (``normalize_on_device`` on the CPU): what a CPU-only run pays in its main process, and what
a GPU does in microseconds.

One torch thread by default, like a DataLoader worker (--threads). Timing and the JSON report are every
benchmark's (benchmarks/common.py), here per full pass over the data set: pass_median_ms / pass_p90_ms over
--repeats passes after one warm-up pass; images/s from the median. open_ms: opening the data set once (index
and header checks). CPU work: --device takes cpu only.
"""

from __future__ import annotations

import tempfile
import time

import common

from samtune.config import DataConfig
from samtune.data.coco import CocoInstanceDataset
from samtune.data.dataset import SamPromptDataset, make_loader
from samtune.data.geometry import normalize_on_device
from samtune.models.architectures import processor_for, tiny_sam2_config, tiny_sam_config
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco


def one_pass(loader, normalize: bool = False) -> int:
    images = 0
    for batch in loader:
        if normalize:
            batch = normalize_on_device(batch)
        images += batch["pixel_values"].shape[0]
    return images


CONFIGS = {"sam": tiny_sam_config, "sam2": tiny_sam2_config}  # the family decides the geometry, not the weights
# (row label, data.normalize_on, normalise each batch in this process too)
PATHS = (("cpu", "cpu", False), ("device", "device", False), ("device+normalise", "device", True))


QUICK = {"images": 6, "side": 128, "workers": [0], "batch_size": 2, "repeats": 3}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(
        __file__,
        __doc__,
        quick="6 images at 128 px, batches of 2, no workers, 3 timed passes",
        cpu_only="decoding and resizing run on the CPU, in the loader's processes",
        threads=1,
    )
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--side", type=int, default=1024, help="model input size (longest edge)")
    parser.add_argument("--family", default="sam", choices=list(CONFIGS), help="whose processor and geometry")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts, one row each")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt", default="box", choices=["box", "point", "box+point", "mixed", "none"])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per worker count")
    args = common.parse(parser, argv, quick=QUICK)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = SyntheticSpec(num_images=args.images, min_side=args.side // 2, max_side=args.side, max_shapes=6)
        annotations, image_dir = make_synthetic_coco(tmp, spec)
        start = time.perf_counter()
        source = CocoInstanceDataset(annotations, image_dir)
        open_ms = (time.perf_counter() - start) * 1000
        processor = processor_for(CONFIGS[args.family](image_size=args.side))
        for workers in args.workers:
            baseline = None
            for label, where, normalize in PATHS:
                config = DataConfig(prompt=args.prompt, max_instances=16, normalize_on=where)
                dataset = SamPromptDataset(source, processor, config, train=True)
                loader = make_loader(dataset, args.batch_size, num_workers=workers)
                images = one_pass(loader, normalize)  # warm-up: file cache, worker start-up code paths
                seconds = common.time_calls(
                    lambda loader=loader, normalize=normalize: one_pass(loader, normalize),
                    args.repeats, 0, common.Timer("cpu"),
                )  # fmt: skip
                times = common.timing("pass", seconds)
                rate = images / (times["pass_median_ms"] / 1000)
                baseline = baseline or rate
                rows.append(
                    {
                        "path": label,
                        "workers": workers,
                        "images": images,
                        "batch_size": args.batch_size,
                        **times,
                        "images_per_s": rate,
                        "speedup": rate / baseline,
                        "input_side": args.side,
                        "family": args.family,
                        "prompt": args.prompt,
                        "open_ms": open_ms,
                    }
                )
    print(f"{common.describe(args.device)}; median (p90) of {args.repeats} passes after one warm-up pass")
    print(f"| normalised on | workers | images/s | vs cpu | ms per pass of {rows[0]['images']} images (p90) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        median, p90 = row["pass_median_ms"], row["pass_p90_ms"]
        print(
            f"| {row['path']} | {row['workers']} | {row['images_per_s']:.1f} | {row['speedup']:.2f}x "
            f"| {median:.0f} ({p90:.0f}) |"
        )
    print(f"opening (index + header checks of {args.images} images): {open_ms:.0f} ms")
    common.report(
        args, rows, data_set=f"{args.images} synthetic COCO images", repeats=args.repeats, family=args.family
    )
    return rows


if __name__ == "__main__":
    main()
