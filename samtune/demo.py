"""The built-in offline demo: a small pretrained SAM shipped with samtune, and a target domain to adapt it to.

``accelerate launch samtune/train.py`` with no model or data runs it: the base in
``samtune/assets/demo-base`` (pretrained by samtune itself on the synthetic *source*
domain) is fine-tuned with DoRA on the *target* domain (``samtune.domains``), and
scored zero-shot and fine-tuned on the held-out test split. The splits are
generated on first use and cached. To rebuild the base:

    python -m samtune.demo pretrain --output runs/demo-pretrain [--install]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

from samtune.domains import DomainSpec, make_domain_coco
from samtune.tiny import save_random_sam

DEMO_VERSION = 2  # bump when what the demo generates changes, so old caches are not reused
BASE_DIR = Path(__file__).resolve().parent / "assets" / "demo-base"
TARGET_SPLITS = {
    "train": DomainSpec("target", 240, seed=7001),
    "val": DomainSpec("target", 40, seed=7002),
    "test": DomainSpec("target", 120, seed=7003),
}
SOURCE_SPLITS = {"train": DomainSpec("source", 3000, seed=5001), "val": DomainSpec("source", 60, seed=5002)}

# What the default run trains with (the user's config file and --section.key options still win).
DEMO_RUN: dict[str, object] = {
    "peft.method": "dora",
    "peft.targets": "peft-sam",
    "peft.rank": 8,
    "peft.alpha": 16.0,
    "train.lr": 3e-3,
    "train.epochs": 4,
    "train.batch_size": 4,
    "train.focal_weight": 1.0,
    "train.dice_weight": 1.0,
    "train.iou_weight": 1.0,
    "train.eval_every": 60,
    "data.max_instances": 8,
    "output_dir": "runs/demo",
}

# How the base is pretrained from random weights on the source domain.
PRETRAIN_RUN: dict[str, object] = {
    "peft.method": "full",
    "data.prompt": "mixed",
    "data.max_instances": 8,
    "train.lr": 1e-3,
    "train.batch_size": 8,
    "train.max_steps": 3000,
    "train.warmup_ratio": 0.02,
    "train.focal_weight": 1.0,
    "train.dice_weight": 1.0,
    "train.iou_weight": 1.0,
    "train.eval_every": 500,
    "train.save_every": 500,
}


@dataclass
class DemoPaths:
    model: Path
    train_annotations: Path
    train_images: Path
    val_annotations: Path
    val_images: Path
    test_annotations: Path
    test_images: Path


def demo_sam_config() -> SamConfig:
    """About 1.3M parameters: SAM's architecture at 256 px, small enough to pretrain and adapt on a laptop CPU."""
    vision = SamVisionConfig(
        hidden_size=128,
        output_channels=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=256,
        patch_size=16,
        window_size=8,
        global_attn_indexes=[1, 3],
        mlp_dim=512,
        num_pos_feats=32,
        initializer_range=0.02,  # transformers' 1e-10 default leaves a from-scratch encoder dead
    )
    # Original SAM's prompt positional encoding has scale 1; transformers derives hidden_size // 2,
    # whose very high frequencies a model trained from scratch cannot use. Only initialisation reads it.
    vision.scale = 1.0
    prompt = SamPromptEncoderConfig(hidden_size=64, image_size=256, patch_size=16, mask_input_channels=8)
    decoder = SamMaskDecoderConfig(
        hidden_size=64, mlp_dim=256, num_hidden_layers=2, num_attention_heads=4, iou_head_hidden_dim=64
    )
    return SamConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, initializer_range=0.02
    )


def cache_root() -> Path:
    """``$SAMTUNE_CACHE``, else ``$XDG_CACHE_HOME/samtune``, else ``~/.cache/samtune``."""
    if os.environ.get("SAMTUNE_CACHE"):
        return Path(os.environ["SAMTUNE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "samtune"


def _build_once(target: Path, build) -> None:
    """Build into a temporary sibling, then rename: an interrupted build never looks finished."""
    if target.exists():
        return
    scratch = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    build(scratch)
    try:
        scratch.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(scratch, ignore_errors=True)


def _splits(folder: Path, specs: dict[str, DomainSpec]) -> dict[str, tuple[Path, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in specs.items():
        _build_once(folder / name, lambda path, spec=spec: make_domain_coco(path, spec))
    return {name: (folder / name / "annotations.json", folder / name / "images") for name in specs}


def prepare_demo(root: str | Path | None = None) -> DemoPaths:
    """The shipped base and the target-domain train / val / test splits (generated once, then cached)."""
    splits = _splits(Path(root) if root else cache_root() / f"demo-v{DEMO_VERSION}" / "target", TARGET_SPLITS)
    return DemoPaths(BASE_DIR, *splits["train"], *splits["val"], *splits["test"])


def prepare_source(root: str | Path | None = None) -> dict[str, tuple[Path, Path]]:
    """The source-domain train / val splits the base is pretrained on."""
    return _splits(Path(root) if root else cache_root() / f"demo-v{DEMO_VERSION}" / "source", SOURCE_SPLITS)


def overrides(settings: dict[str, object]) -> list[str]:
    """``--section.key value`` arguments for train.py."""
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def pretrain(output: str | Path, steps: int | None = None, seed: int = 0, extra: list[str] | None = None) -> dict:
    """Pretrain a base from random weights on the source domain with samtune's own loop; report both domains."""
    from samtune.evaluate import main as evaluate_main
    from samtune.train import main as train_main

    output = Path(output)
    source = prepare_source()
    target = prepare_demo()
    init = output / "init"
    if not init.exists():
        save_random_sam(demo_sam_config(), init, seed=seed)
    settings = dict(PRETRAIN_RUN, **({"train.max_steps": steps} if steps else {}))
    args = overrides(settings) + [
        "--model.name_or_path", str(init),
        "--data.train_annotations", str(source["train"][0]), "--data.train_images", str(source["train"][1]),
        "--data.val_annotations", str(source["val"][0]), "--data.val_images", str(source["val"][1]),
        "--train.seed", str(seed), "--train.resume_from", "latest", "--output_dir", str(output / "run"),
    ]  # fmt: skip
    started = time.perf_counter()
    results = train_main(args + (extra or []))
    minutes = (time.perf_counter() - started) / 60
    base = output / "run" / "best"
    scores = {}
    splits = {"source_val": source["val"], "target_test": (target.test_annotations, target.test_images)}
    for name, (labels, images) in splits.items():
        for prompt in ("box", "point"):
            metrics = evaluate_main(
                ["--model", str(base), "--annotations", str(labels), "--images", str(images),
                 "--prompt", prompt, "--batch-size", "8", "--output", str(output / f"eval-{name}-{prompt}.json")]
            )  # fmt: skip
            scores[f"{name}_{prompt}_mIoU"] = metrics["mIoU"]
    record = {
        "command": f"python -m samtune.demo pretrain --output {output} --seed {seed}"
        + (f" --steps {steps}" if steps else ""),
        "minutes": round(minutes, 1),
        "steps": settings["train.max_steps"],
        "best_step": results.get("best_step"),
        "seed": seed,
        **{k: round(v, 4) for k, v in scores.items()},
    }
    (output / "pretraining.json").write_text(json.dumps(record, indent=2))
    return record


def install(output: str | Path) -> Path:
    """Copy a pretraining run's best weights and processor into the package as the shipped base."""
    best = Path(output) / "run" / "best"
    scratch = BASE_DIR.with_name("demo-base.new")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "processor_config.json"):
        shutil.copy2(best / name, scratch / name)
    shutil.copy2(Path(output) / "pretraining.json", scratch / "pretraining.json")
    shutil.rmtree(BASE_DIR, ignore_errors=True)
    scratch.rename(BASE_DIR)
    return BASE_DIR


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m samtune.demo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("pretrain", help="pretrain the demo base on the source domain")
    run.add_argument("--output", default="runs/demo-pretrain", help="run folder (resumes if it has checkpoints)")
    run.add_argument("--steps", type=int, help=f"optimizer steps (default {PRETRAIN_RUN['train.max_steps']})")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--install", action="store_true", help=f"copy the result to {BASE_DIR}")
    commands.add_parser("prepare", help="generate and cache the demo splits")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        print(prepare_demo(), prepare_source(), sep="\n")
        return
    record = pretrain(args.output, args.steps, args.seed, extra)
    print(json.dumps(record, indent=2))
    if args.install:
        print(f"installed {install(args.output)}")


if __name__ == "__main__":
    main()
