"""Fine-tune a SAM checkpoint on COCO instance masks.

    samtune train [--config FILE.yaml] [--section.key value ...]
    accelerate launch [--multi_gpu ...] -m samtune.train [...]      (or accelerate launch samtune/train.py)

With neither a model nor any data given it runs the built-in offline demo (a small SAM and synthetic shapes,
made on first use); otherwise it needs a model and a training split. Every key is listed below with its
choices and default; boolean keys alone mean true (--overwrite).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repository, not samtune/, on the path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from samtune.config import Config, is_demo, parse_args
from samtune.demo.assets import RUN_CONFIG
from samtune.errors import run_command


def parse_config(argv: list[str] | None = None) -> Config:
    """The run's config; with neither a model nor any data given, the demo's settings under the user's keys."""
    config = parse_args(argv, description=__doc__)
    if is_demo(config):
        config = parse_args(argv, description=__doc__, defaults_file=RUN_CONFIG)
    return config


def train(config: Config) -> dict:
    """Train as ``config`` says; returns the results (also written to ``output_dir/results.json``)."""
    from samtune.training.run import StopSignals, TrainingRun  # here: torch and transformers load slowly (--help)

    run = TrainingRun(config)  # accelerator, model, data, cache, optimizer, run folder
    with StopSignals(run.accelerator) as signals, run.progress:
        run.begin()  # resume, or score the starting weights
        run.check_signals(signals)
        for batch in [] if run.done else run.batches():
            if not run.train_step(batch):  # forward, loss, backward; an optimizer step every grad_accum batches
                continue
            run.after_step(signals)  # log, validate and keep the best, checkpoint, stop?
            if run.done:
                break
    results = run.finish()  # final/, test scores, results.json; or a checkpoint to resume from
    if run.interrupted and signals.signal:
        sys.exit(128 + signals.signal)
    return results


def main(argv: list[str] | None = None) -> dict:
    return train(parse_config(argv))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune train"))
