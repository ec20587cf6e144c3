"""The PEFT-SAM experiment in miniature: every method adapting a shipped demo base to the target domain.

    python benchmarks/method_table.py [--base sam|sam2] [--methods none full decoder lora dora qlora qdora]
        [--seeds 0 1 2] [--output runs/method-table] [--markdown table.md] [--threads 1] [--json table.json]
        [-- --train.epochs 6 ...]
    python benchmarks/method_table.py --quick --json out.json   # none and dora, 2 seeds, 2 steps on 6 images

--base picks the demo base (``samtune.demo.bases``): sam (default, ``samtune/demo/base``) or sam2 (SAM 2's
architecture, ``samtune/demo/base-sam2``), each run as ``samtune train --model.demo_base BASE`` would.

Each (method, seed) is one ``samtune/train.py`` run in its own process (so its peak memory is its own) with the
default run's settings (``samtune/demo/run.yaml``, ``samtune.demo.assets.RUN_CONFIG``) and the method's learning
rate: checkpoint selection on the validation split only, scored once on the held-out test split. ``none`` is the
zero-shot base. Arguments after ``--`` go to every run. Finished runs are reused, so an interrupted table resumes
where it stopped. --quick trains on tiny generated target-domain splits (made once under the output folder) for
2 steps, with the default run's settings otherwise.

The JSON report is every benchmark's (benchmarks/common.py), written to --json (default: OUTPUT/table.json): one
row per method with mean and sample standard deviation over the seeds (``NAME_mean``, ``NAME_std``; times in ms,
``train_*_ms`` from the run's epoch times; memory in MiB, ``peak_memory_*_mib``, the run's own peak) and its
per-seed runs under ``runs``. Gains are over the shipped base's zero-shot score. This is an experiment over
seeds, not a timing: the statistic is mean +- std, as the printed table shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "samtune" / "train.py"
METHODS = ("none", "dora", "lora", "qdora", "qlora", "decoder", "full")
# One peak learning rate per family, fixed before the runs (not tuned per method): adapters start at zero and
# take larger steps; full fine-tuning moves every pretrained weight and takes the smallest.
LEARNING_RATES = {"full": 3e-4, "decoder": 1e-3, "lora": 3e-3, "dora": 3e-3, "qlora": 3e-3, "qdora": 3e-3}
QUICK_SPLITS = {"train": 6, "val": 3, "test": 3}  # images per tiny target-domain split under --quick
MEASURES = ("test_mIoU", "test_mF1", "gain_mIoU", "start_mIoU")
BASES = ("sam", "sam2")  # samtune.demo.bases.BASES, named here so that --help does not load transformers
DEFAULT_BASE = "sam"


def launch(command: list[str], env: dict[str, str]) -> None:
    """Run one training process to completion (tests replace this)."""
    subprocess.run(command, check=True, env=env)


def run_env(device: torch.device, threads: int) -> dict[str, str]:
    """A run's environment: its thread count, no progress bars, and only the GPU asked for (none for cpu)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the training loop takes a GPU whenever it sees one
    elif device.index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device.index)
    return env


def run_one(
    method: str, seed: int, output: Path, extra: list[str], threads: int, device: torch.device, base: str = "sam"
) -> dict:
    """Train (or only score, for ``none``) in a fresh process; reuse a finished run's results."""
    folder = output / f"{method}-seed{seed}"
    results_file = folder / "results.json"
    if not results_file.exists():
        command = [sys.executable, str(TRAIN_SCRIPT), "--peft.method", method, "--train.seed", str(seed),
                   "--output_dir", str(folder), "--train.resume_from", "latest"]  # fmt: skip
        if base != DEFAULT_BASE:
            command += ["--model.demo_base", base]
        if method in LEARNING_RATES:
            command += ["--train.lr", str(LEARNING_RATES[method])]
        started = time.perf_counter()
        launch(command + extra, run_env(device, threads))
        results = json.loads(results_file.read_text())
        results["wall_seconds"] = time.perf_counter() - started
        results_file.write_text(json.dumps(results, indent=2))
    results = json.loads(results_file.read_text())
    test = results.get("test") or {}
    if not test.get("best"):
        raise RuntimeError(f"{results_file}: no test-split score (the run needs data.test_annotations)")
    wall = results.get("wall_seconds")
    peak_gib = results.get("peak_memory_gib")
    return {
        "method": method,
        "seed": seed,
        "test_mIoU": test["best"]["mIoU"],
        "test_mF1": test["best"]["mF1"],
        "zero_shot_mIoU": test["zero_shot"]["mIoU"],
        "trainable": results["parameters"]["all"]["trainable"],
        "train_ms": 1000 * sum(results["epoch_seconds"]),
        "wall_ms": None if wall is None else 1000 * wall,
        "peak_memory_mib": None if peak_gib is None else peak_gib * 1024,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(runs: list[dict]) -> list[dict]:
    """One row per method, in the order the runs came: mean and std over its seeds, its runs beside them.

    Gains are over the shipped base's zero-shot test score (the ``none`` runs, the same for every method); without
    ``none`` runs, over each run's own start. A 4-bit run's own start, its quantised base, is reported beside it.
    """
    base = [run["zero_shot_mIoU"] for run in runs if run["method"] == "none"]
    rows = []
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == method]
        values = {
            "test_mIoU": [run["test_mIoU"] for run in mine],
            "test_mF1": [run["test_mF1"] for run in mine],
            "gain_mIoU": [run["test_mIoU"] - (np.mean(base) if base else run["zero_shot_mIoU"]) for run in mine],
            "start_mIoU": [run["zero_shot_mIoU"] for run in mine],
        }
        row: dict = {"method": method, "seeds": len(mine), "trainable": mine[0]["trainable"]}
        for name in MEASURES:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(values[name])
        row["train_mean_ms"], row["train_std_ms"] = mean_std([run["train_ms"] for run in mine])
        peaks = [run["peak_memory_mib"] for run in mine if run["peak_memory_mib"] is not None]
        row["peak_memory_mean_mib"], row["peak_memory_std_mib"] = mean_std(peaks) if peaks else (None, None)
        row["runs"] = mine
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | test mIoU % | test mF1 % | gain over zero-shot (mIoU points) | its start: test mIoU % at step 0 "
        "| trainable params | training time (s) | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peak = "" if row["peak_memory_mean_mib"] is None else f"{row['peak_memory_mean_mib']:.0f}"
        lines.append(
            f"| {'zero-shot' if row['method'] == 'none' else row['method']} "
            f"| {100 * row['test_mIoU_mean']:.1f} +- {100 * row['test_mIoU_std']:.1f} "
            f"| {100 * row['test_mF1_mean']:.1f} +- {100 * row['test_mF1_std']:.1f} "
            f"| {100 * row['gain_mIoU_mean']:+.1f} +- {100 * row['gain_mIoU_std']:.1f} "
            f"| {100 * row['start_mIoU_mean']:.1f} | {row['trainable']:,} "
            f"| {row['train_mean_ms'] / 1000:.0f} +- {row['train_std_ms'] / 1000:.0f} | {peak} |"
        )
    return "\n".join(lines)


def quick_data(output: Path, base: str = "sam") -> list[str]:
    """Tiny target-domain splits under ``output/data`` (made once), as train.py arguments with the demo base and
    the default run's settings, 2 steps, no DataLoader workers."""
    from samtune.demo.assets import RUN_CONFIG
    from samtune.demo.bases import demo_base
    from samtune.demo.domains import DomainSpec, make_domain_coco

    folder = demo_base(base).folder
    extra = ["--config", str(RUN_CONFIG), "--model.name_or_path", str(folder), "--train.max_steps", "2",
             "--data.num_workers", "0", "--train.log_images", "0"]  # fmt: skip
    for seed, (name, count) in enumerate(QUICK_SPLITS.items(), start=9001):
        folder = output / "data" / name
        if not (folder / "annotations.json").exists():
            make_domain_coco(folder, DomainSpec("target", count, seed=seed))
        extra += [f"--data.{name}_annotations", str(folder / "annotations.json")]
        extra += [f"--data.{name}_images", str(folder / "images")]
    return extra


QUICK = {"methods": ["none", "dora"], "seeds": [0, 1], "output": ROOT / "runs" / "method-table-quick"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(
        __file__,
        __doc__,
        quick="methods none and dora, seeds 0 and 1, 2 steps on tiny generated splits (output runs/method-table-quick)",
        threads=1,
    )
    parser.add_argument("--base", default=DEFAULT_BASE, choices=BASES, help="the demo base (default: sam)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "method-table", help="one folder per run")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.epilog = (
        "--threads is per run: the demo model gains little from more, and one thread per run keeps timings\n"
        "steady on a shared machine. Arguments after -- go to every train.py run."
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # passed to every train.py run
    args = common.parse(parser, argv[: argv.index("--")] if "--" in argv else argv, quick=QUICK)
    args.argv = argv
    if args.quick:
        extra = quick_data(args.output, args.base) + extra  # the user's arguments come last and win
    runs = []
    for method in args.methods:
        for seed in args.seeds:
            run = run_one(method, seed, args.output, extra, args.threads, args.device, args.base)
            runs.append(run)
            print(json.dumps(run), flush=True)
    rows = summarise(runs)
    table = markdown(rows)
    print(table)
    args.json = args.json or args.output / "table.json"
    common.report(
        args,
        rows,
        output=str(args.output),
        base=args.base,
        train_args=extra,
        learning_rates=LEARNING_RATES,
        statistic="mean and sample std over seeds",
    )
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
