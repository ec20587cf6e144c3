"""Pretrain a demo base from random weights on the synthetic source domain, with samtune's own loop.

    samtune demo pretrain --output runs/demo-pretrain [--base sam|sam2] [--seed N] [--steps N] [--install]
        [--section.key v]

``--base`` picks the architecture (``samtune.demo.bases``: sam, the default, or sam2); every base is pretrained
with the settings in ``samtune/demo/pretrain.yaml`` (full fine-tuning, mixed prompts, 3000 steps) and its own
prompts (``DemoBase.prompt``: SAM 2 draws box+point), a base with ``decoder_first_steps`` (SAM 2) spending those
first on its decoder alone (``OUTPUT/decoder-first``) and the rest on everything; resumable (each stage continues
from its latest checkpoint). Scores source val and target test with box and point prompts into
``pretraining.json``; ``--install`` copies the best weights into the base's folder (``samtune/demo/base``,
``samtune/demo/base-sam2``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from samtune.config import parse_args
from samtune.demo import assets
from samtune.demo.bases import BASES, DEFAULT_BASE, demo_base
from samtune.evaluate import main as evaluate_main
from samtune.models.architectures import save_random_sam
from samtune.train import train


def pretrain(
    output: str | Path,
    steps: int | None = None,
    seed: int = 0,
    extra: list[str] | None = None,
    base: str = DEFAULT_BASE,
) -> dict:
    """Pretrain a base on the source domain; score it on both domains; record the command and the scores."""
    output = Path(output)
    source = assets.prepare_source()
    target = assets.prepare_demo()  # the target splits, the same for every base (whose own may not exist yet)
    init = output / "init"
    if not init.exists():
        save_random_sam(demo_base(base).config(), init, seed=seed)
    paths = {
        "data.train_annotations": source["train"][0], "data.train_images": source["train"][1],
        "data.val_annotations": source["val"][0], "data.val_images": source["val"][1],
        "data.prompt": demo_base(base).prompt, "train.seed": seed, "train.resume_from": "latest",
    }  # fmt: skip
    argv = [item for key, value in paths.items() for item in (f"--{key}", str(value))] + (extra or [])
    settings = parse_args(["--model.name_or_path", str(init), *argv], defaults_file=assets.PRETRAIN_CONFIG)
    total = steps or settings.train.max_steps
    first = min(demo_base(base).decoder_first_steps, total - 1)
    started = time.perf_counter()
    if first > 0:  # the decoder alone, then everything from its final weights
        stage = ["--model.name_or_path", str(init), "--output_dir", str(output / "decoder-first"),
                 "--peft.method", "decoder", "--train.max_steps", str(first)]  # fmt: skip
        train(parse_args(argv + stage, defaults_file=assets.PRETRAIN_CONFIG))
        init = output / "decoder-first" / "final"
    stage = ["--model.name_or_path", str(init), "--output_dir", str(output / "run"), "--train.max_steps",
             str(total - first)]  # fmt: skip
    config = parse_args(argv + stage, defaults_file=assets.PRETRAIN_CONFIG)
    results = train(config)
    minutes = (time.perf_counter() - started) / 60
    scores = {}
    splits = {"source_val": source["val"], "target_test": (target.test_annotations, target.test_images)}
    for name, (labels, images) in splits.items():
        for prompt in ("box", "point"):
            metrics = evaluate_main(
                ["--model", str(output / "run" / "best"), "--annotations", str(labels), "--images", str(images),
                 "--prompt", prompt, "--batch-size", "8", "--output", str(output / f"eval-{name}-{prompt}.json")]
            )  # fmt: skip
            scores[f"{name}_{prompt}_mIoU"] = metrics["mIoU"]
    record = {
        "command": f"samtune demo pretrain --output {output}"
        + (f" --base {base}" if base != DEFAULT_BASE else "")
        + f" --seed {seed}"
        + (f" --steps {steps}" if steps else "")
        + "".join(f" {item}" for item in extra or []),
        "base": base,
        "parameters": json.loads((output / "run" / "parameters.json").read_text())["all"]["total"],
        "minutes": round(minutes, 1),
        "threads": torch.get_num_threads(),
        "steps": total,
        "decoder_first_steps": first,
        "prompt": config.data.prompt,
        "lr": config.train.lr,
        "best_step": results.get("best_step"),
        "seed": seed,
        **{k: round(v, 4) for k, v in scores.items()},
    }
    (output / "pretraining.json").write_text(json.dumps(record, indent=2))
    return record


def install(output: str | Path, base_dir: Path | None = None) -> Path:
    """Copy a pretraining run's best weights and processor into the package as the shipped base (default: the
    default base's folder)."""
    base_dir = base_dir or demo_base(DEFAULT_BASE).folder
    best = Path(output) / "run" / "best"
    scratch = base_dir.with_name(f"{base_dir.name}.new")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "processor_config.json"):
        shutil.copy2(best / name, scratch / name)
    shutil.copy2(Path(output) / "pretraining.json", scratch / "pretraining.json")
    shutil.rmtree(base_dir, ignore_errors=True)
    scratch.rename(base_dir)
    return base_dir


def main(argv: list[str] | None = None) -> None:
    """Generate the demo's splits (prepare), or pretrain its base again and install it (pretrain)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("pretrain", help="pretrain the demo base on the source domain (extra: --section.key v)")
    run.add_argument("--output", default="runs/demo-pretrain", help="run folder (resumes if it has checkpoints)")
    run.add_argument("--steps", type=int, help="optimizer steps (default: train.max_steps of demo/pretrain.yaml)")
    run.add_argument("--base", default=DEFAULT_BASE, choices=list(BASES), help="the architecture (default: sam)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--install", action="store_true", help="copy the result to the base's folder, samtune/demo/BASE")
    commands.add_parser("prepare", help="generate and cache the demo splits")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        print(assets.prepare_demo(), assets.prepare_source(), sep="\n")
        return
    record = pretrain(args.output, args.steps, args.seed, extra, base=args.base)
    print(json.dumps(record, indent=2))
    if args.install:
        print(f"installed {install(args.output, demo_base(args.base).folder)}")
