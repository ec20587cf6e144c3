"""Does training augmentation help when data are few? data.augment none / light / strong on 24 target images.

    python benchmarks/augment_table.py [--augments none light strong] [--seeds 0 1 2] [--images 24]
        [--method dora] [--output runs/augment-table] [--markdown table.md] [--threads 1] [--json table.json]
        [-- --train.epochs 25 ...]
    python benchmarks/augment_table.py --quick --json out.json   # none and strong, 1 seed, 2 steps on 6 images

The demo's setting (the shipped SAM base, the synthetic target domain, ``samtune/demo/run.yaml``) in a low-data
regime: a training split of ``--images`` target-domain images (made once under the output folder, from its own
seed), the demo's 40-image validation split for selecting the checkpoint and its 120-image test split for the
score. Each (augment, seed) is one ``samtune/train.py`` run in its own process (``method_table.run_one``, so
finished runs are reused and an interrupted table resumes), with ``--data.augment`` and the method's learning
rate; arguments after ``--`` go to every run (default budget here: ``--train.epochs 25 --train.eval_every 25``).

The JSON report is every benchmark's (benchmarks/common.py): one row per preset with the mean and sample
standard deviation over the seeds of test mIoU and mF1 and of the median epoch time (``epoch_mean_ms``: the
median over a run's epochs, so the epochs that hold a validation do not count), runs under ``runs``. The runs
follow one another, so their epoch times also follow the machine's load; ``loader_pass_median_ms`` (and p90) is
what augmentation costs measured side by side: passes over the same training loader in this process, the presets
taking turns (``--loader-rounds``).
This is an experiment over seeds, not a timing: the statistic is mean +- std.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import common
import method_table
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
AUGMENTS = ("none", "light", "strong")
BUDGET = ["--train.epochs", "25", "--train.eval_every", "25", "--train.log_images", "0"]
TRAIN_SEED = 7101  # the small training split's own generator seed (the demo's 240-image split uses 7001)
QUICK = {"augments": ["none", "strong"], "seeds": [0], "images": 6, "loader_rounds": 1,
         "output": ROOT / "runs" / "augment-table-quick"}  # fmt: skip


def small_split(output: Path, images: int, quick: bool) -> list[str]:
    """train.py arguments: the demo base and run settings, ``images`` target-domain training images (made once),
    and the demo's val and test splits (the tiny ones of method_table under --quick)."""
    from samtune.demo.assets import BASE_DIR, RUN_CONFIG, prepare_demo
    from samtune.demo.domains import DomainSpec, make_domain_coco

    folder = output / "data" / f"train-{images}"
    if not (folder / "annotations.json").exists():
        make_domain_coco(folder, DomainSpec("target", images, seed=TRAIN_SEED))
    train = ["--data.train_annotations", str(folder / "annotations.json")]
    train += ["--data.train_images", str(folder / "images")]
    if quick:  # method_table's tiny val / test splits and 2 steps; this training split (a repeated key: the last wins)
        return method_table.quick_data(output) + train
    demo = prepare_demo()
    extra = ["--config", str(RUN_CONFIG), "--model.name_or_path", str(BASE_DIR), *train]
    extra += ["--data.val_annotations", str(demo.val_annotations), "--data.val_images", str(demo.val_images)]
    extra += ["--data.test_annotations", str(demo.test_annotations), "--data.test_images", str(demo.test_images)]
    return extra + BUDGET


def loader_passes(train: list[str], augments: list[str], rounds: int) -> dict[str, list[float]]:
    """Seconds of one pass over the training loader (no workers, this process's threads) per preset, the presets
    taking turns round after round so that the machine's load falls on all alike: what augmentation costs."""
    from transformers import AutoProcessor

    from samtune.config import DataConfig
    from samtune.data.coco import CocoInstanceDataset
    from samtune.data.dataset import SamPromptDataset, make_loader
    from samtune.demo.assets import BASE_DIR

    options = dict(zip(train[::2], train[1::2]))
    source = CocoInstanceDataset(options["--data.train_annotations"], options["--data.train_images"])
    processor = AutoProcessor.from_pretrained(BASE_DIR)  # the SAM demo base
    seconds: dict[str, list[float]] = {augment: [] for augment in augments}
    for epoch in range(rounds + 1):  # the first round warms up
        for augment in augments:
            dataset = SamPromptDataset(source, processor, DataConfig(augment=augment, max_instances=8), seed=epoch)
            dataset.set_epoch(epoch)
            started = time.perf_counter()
            for _ in make_loader(dataset, batch_size=4, num_workers=0):
                pass
            if epoch:
                seconds[augment].append(time.perf_counter() - started)
    return seconds


def summarise(runs: list[dict], loader: dict[str, list[float]] | None = None) -> list[dict]:
    """One row per preset, in the order the runs came: mean and sample std over its seeds; with ``loader``, the
    median and p90 of its loader passes (``loader_pass_median_ms``)."""
    rows = []
    for augment in dict.fromkeys(run["augment"] for run in runs):
        mine = [run for run in runs if run["augment"] == augment]
        row: dict = {"augment": augment, "seeds": len(mine)}
        for name in ("test_mIoU", "test_mF1", "epoch_ms"):
            mean, std = method_table.mean_std([run[name] for run in mine])
            key = name.removesuffix("_ms")
            row[f"{key}_mean{'_ms' if name.endswith('_ms') else ''}"] = mean
            row[f"{key}_std{'_ms' if name.endswith('_ms') else ''}"] = std
        row["dropped_instances"] = sum(run["dropped_instances"] for run in mine)
        passes = loader.get(augment) if loader else None
        if passes:
            row.update(common.timing("loader_pass", passes))
        row["runs"] = mine
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| data.augment | test mIoU % | test mF1 % | time per epoch (s) | loader pass, side by side (s) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        loader = f"{row['loader_pass_median_ms'] / 1000:.2f}" if "loader_pass_median_ms" in row else ""
        lines.append(
            f"| {row['augment']} | {100 * row['test_mIoU_mean']:.1f} +- {100 * row['test_mIoU_std']:.1f} "
            f"| {100 * row['test_mF1_mean']:.1f} +- {100 * row['test_mF1_std']:.1f} "
            f"| {row['epoch_mean_ms'] / 1000:.2f} +- {row['epoch_std_ms'] / 1000:.2f} | {loader} | {row['seeds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(__file__, __doc__, quick="none and strong, seed 0, 2 steps on 6 images", threads=1)
    parser.add_argument("--augments", nargs="+", default=list(AUGMENTS), choices=AUGMENTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=24, help="training images (default: 24)")
    parser.add_argument("--method", default="dora", choices=[m for m in method_table.METHODS if m != "none"])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "augment-table", help="one folder per run")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument(
        "--loader-rounds", type=int, default=5, help="side-by-side passes over the training loader per preset (0: none)"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # passed to every train.py run, last (they win)
    args = common.parse(parser, argv[: argv.index("--")] if "--" in argv else argv, quick=QUICK)
    args.argv = argv
    extra = small_split(args.output, args.images, args.quick) + extra
    runs = []
    for augment in args.augments:
        for seed in args.seeds:
            folder = args.output / augment
            run = method_table.run_one(
                args.method, seed, folder, [*extra, "--data.augment", augment], args.threads, args.device
            )
            results = json.loads((folder / f"{args.method}-seed{seed}" / "results.json").read_text())
            run.update(
                augment=augment,
                epoch_ms=1000 * float(np.median(results["epoch_seconds"])),
                dropped_instances=results.get("dropped_instances", 0),
            )
            runs.append(run)
            print(json.dumps(run), flush=True)
    train = extra[extra.index("--data.train_annotations") : extra.index("--data.train_annotations") + 4]
    loader = loader_passes(train, args.augments, args.loader_rounds) if args.loader_rounds else None
    rows = summarise(runs, loader)
    table = markdown(rows)
    print(table)
    args.json = args.json or args.output / "table.json"
    common.report(
        args, rows, output=str(args.output), method=args.method, images=args.images, train_args=extra,
        statistic="mean and sample std over seeds",
    )  # fmt: skip
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
