"""The PEFT-SAM experiment in miniature: every method adapting the shipped demo base to the target domain.

    python benchmarks/method_table.py [--methods none full decoder lora dora qlora qdora] [--seeds 0 1 2]
                                      [--output runs/method-table] [--markdown table.md] [-- --train.epochs 6 ...]

Each (method, seed) is one ``samtune/train.py`` run in its own process (so its peak memory is its own) with
the default run's settings (``samtune.demo.DEMO_RUN``) and the method's learning rate: checkpoint selection on
the validation split only, scored once on the held-out test split. ``none`` is the zero-shot base. Finished
runs are reused, so an interrupted table resumes where it stopped. Prints mean +- std over the seeds of test
mIoU / mF1, trainable parameters, training time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("none", "dora", "lora", "qdora", "qlora", "decoder", "full")
# One peak learning rate per family, fixed before the runs (not tuned per method): adapters start at zero and
# take larger steps; full fine-tuning moves every pretrained weight and takes the smallest.
LEARNING_RATES = {"full": 3e-4, "decoder": 1e-3, "lora": 3e-3, "dora": 3e-3, "qlora": 3e-3, "qdora": 3e-3}


def run_one(method: str, seed: int, output: Path, extra: list[str], threads: int = 1) -> dict:
    """Train (or only score, for ``none``) in a fresh process; reuse a finished run's results."""
    folder = output / f"{method}-seed{seed}"
    results_file = folder / "results.json"
    if not results_file.exists():
        command = [sys.executable, str(ROOT / "samtune" / "train.py"), "--peft.method", method,
                   "--train.seed", str(seed), "--output_dir", str(folder), "--train.resume_from", "latest"]  # fmt: skip
        if method in LEARNING_RATES:
            command += ["--train.lr", str(LEARNING_RATES[method])]
        started = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
        subprocess.run(command + extra, check=True, env=env)
        results = json.loads(results_file.read_text())
        results["wall_seconds"] = time.perf_counter() - started
        results_file.write_text(json.dumps(results, indent=2))
    results = json.loads(results_file.read_text())
    test = results.get("test") or {}
    if not test.get("best"):
        raise RuntimeError(f"{results_file}: no test-split score (the run needs data.test_annotations)")
    return {
        "method": method,
        "seed": seed,
        "test_mIoU": test["best"]["mIoU"],
        "test_mF1": test["best"]["mF1"],
        "zero_shot_mIoU": test["zero_shot"]["mIoU"],
        "trainable": results["parameters"]["all"]["trainable"],
        "train_seconds": sum(results["epoch_seconds"]),
        "wall_seconds": results.get("wall_seconds"),
        "peak_memory_gb": results.get("peak_memory_gb"),
    }


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]

        def stats(key: str, mine=mine) -> tuple[float, float]:
            values = np.array([row[key] for row in mine], dtype=float)
            return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0

        summary.append(
            {
                "method": method,
                "seeds": len(mine),
                "test_mIoU": stats("test_mIoU"),
                "test_mF1": stats("test_mF1"),
                "gain_mIoU": stats("gain"),
                "start_mIoU": stats("zero_shot_mIoU"),
                "trainable": mine[0]["trainable"],
                "train_seconds": stats("train_seconds"),
                "peak_memory_gb": stats("peak_memory_gb"),
            }
        )
    return summary


def markdown(summary: list[dict]) -> str:
    lines = [
        "| method | test mIoU % | test mF1 % | gain over zero-shot (mIoU points) | its start: test mIoU % at step 0 "
        "| trainable params | training time (s) | peak memory (GB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        miou, f1, gain = row["test_mIoU"], row["test_mF1"], row["gain_mIoU"]
        lines.append(
            f"| {'zero-shot' if row['method'] == 'none' else row['method']} "
            f"| {100 * miou[0]:.1f} +- {100 * miou[1]:.1f} | {100 * f1[0]:.1f} +- {100 * f1[1]:.1f} "
            f"| {100 * gain[0]:+.1f} +- {100 * gain[1]:.1f} | {100 * row['start_mIoU'][0]:.1f} | {row['trainable']:,} "
            f"| {row['train_seconds'][0]:.0f} +- {row['train_seconds'][1]:.0f} "
            f"| {row['peak_memory_gb'][0]:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "method-table")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per run: the demo model gains little from more, and one thread per run keeps timings "
        "steady on a shared machine",
    )
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # passed to every train.py run
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            row = run_one(method, seed, args.output, extra, args.threads)
            rows.append(row)
            print(json.dumps(row), flush=True)
    # Gains are over the shipped base's zero-shot score (the same for every method); a 4-bit run's own start,
    # its quantised base, is reported beside it.
    base = np.mean([row["zero_shot_mIoU"] for row in rows if row["method"] == "none"] or [np.nan])
    for row in rows:
        row["gain"] = row["test_mIoU"] - (base if not np.isnan(base) else row["zero_shot_mIoU"])
    summary = summarise(rows)
    table = markdown(summary)
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table.json").write_text(json.dumps({"runs": rows, "summary": summary, "extra": extra}, indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return summary


if __name__ == "__main__":
    main()
