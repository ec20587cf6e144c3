"""Fine-tune a SAM checkpoint on COCO instance masks.

    accelerate launch samtune/train.py [--config FILE.yaml] [--section.key value ...]

With no data or model given it runs the built-in offline demo (a small SAM and
synthetic shapes, made on first use). Every key is listed below with its default.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repository, not samtune/, on the path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from samtune.config import Config, parse_args, save_config
from samtune.data import CocoInstanceDataset, SamPromptDataset, make_loader
from samtune.demo import prepare_demo
from samtune.evaluation import aggregate, sam_forward, score_batch
from samtune.losses import InstanceLoss
from samtune.modeling import build_model, format_report, parameter_report, save_trained
from samtune.prompts import PromptConfig

logger = logging.getLogger("samtune.train")


def fill_demo_defaults(config: Config) -> None:
    """Point empty model / data keys at the built-in demo (demo validation data only with demo training data)."""
    if config.model.name_or_path and config.data.train_annotations:
        return
    demo = prepare_demo()
    if not config.model.name_or_path:
        config.model.name_or_path = str(demo.model)
    if not config.data.train_annotations:
        config.data.train_annotations, config.data.train_images = str(demo.train_annotations), str(demo.train_images)
        if not config.data.val_annotations:
            config.data.val_annotations, config.data.val_images = str(demo.val_annotations), str(demo.val_images)


def build_loaders(config: Config, processor):
    data = config.data
    prompt = PromptConfig(data.prompt, data.box_jitter, data.num_points, data.num_negative_points)
    train_source = CocoInstanceDataset(data.train_annotations, data.train_images, data.check_images)
    train_set = SamPromptDataset(
        train_source, processor, prompt, data.max_instances, train=True, seed=config.train.seed
    )
    train_loader = make_loader(train_set, config.train.batch_size, data.num_workers, seed=config.train.seed)
    val_loader, categories = None, train_source.categories
    if data.val_annotations:
        val_source = CocoInstanceDataset(data.val_annotations, data.val_images, data.check_images)
        val_set = SamPromptDataset(val_source, processor, prompt, data.max_instances, train=False)
        val_loader = make_loader(val_set, config.train.batch_size, data.num_workers)
        categories = val_source.categories
    return train_set, train_loader, val_loader, categories


def training_loss(model, batch: dict, loss_fn: InstanceLoss) -> dict[str, torch.Tensor]:
    """Mean per-instance loss over the valid instances of a batch; padding never reaches the loss."""
    outputs = sam_forward(model, batch, multimask_output=False)
    valid = batch["valid"]
    keep = ~batch["ignore"][:, None].expand_as(batch["labels"])
    losses = loss_fn(
        outputs.pred_masks[:, :, 0][valid], batch["labels"][valid], keep[valid], outputs.iou_scores[:, :, 0][valid]
    )
    return {name: value.mean() for name, value in losses.items()}


def evaluate(model, loader, processor, accelerator: Accelerator, categories: dict[int, str]) -> dict:
    model.eval()
    records = []
    for batch in tqdm(loader, desc="eval", disable=not accelerator.is_local_main_process, leave=False):
        with torch.no_grad():
            records += score_batch(sam_forward(model, batch), batch, processor)
    model.train()
    # Each rank scored its shard; duplicates padded in by the sampler collapse on (image, annotation) id.
    return aggregate(gather_object(records), categories)


def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv, description=__doc__)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.train.grad_accum,
        mixed_precision=config.train.mixed_precision or None,
        log_with="tensorboard",
        project_dir=config.output_dir,
    )
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with accelerator.main_process_first():
        fill_demo_defaults(config)
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    set_seed(config.train.seed)

    model, processor = build_model(config.model, config.peft)
    report = parameter_report(model)
    logger.info("parameters (%s, targets %s):\n%s", config.peft.method, config.peft.targets, format_report(report))
    if accelerator.is_main_process:
        (out / "parameters.json").write_text(json.dumps(report, indent=2))
    with accelerator.main_process_first():
        train_set, train_loader, val_loader, categories = build_loaders(config, processor)

    trainable = [p for p in model.parameters() if p.requires_grad]
    # an optimizer needs at least one tensor; with nothing to train it never steps
    optimizer = torch.optim.AdamW(
        trainable or [torch.zeros(1)], lr=config.train.lr, weight_decay=config.train.weight_decay
    )
    steps_per_epoch = math.ceil(len(train_loader) / config.train.grad_accum)
    total_steps = config.train.max_steps or steps_per_epoch * config.train.epochs
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=int(0.05 * total_steps), num_training_steps=total_steps
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    accelerator.init_trackers("tensorboard", config={k: str(v) for k, v in vars(config.train).items()})
    loss_fn = InstanceLoss()

    metrics_file = out / "metrics.jsonl"
    if accelerator.is_main_process:
        metrics_file.write_text("")  # a new run starts a new log
    results: dict = {}
    if val_loader is not None:
        results["zero_shot"] = evaluate(model, val_loader, processor, accelerator, categories)
        logger.info(
            "before training: val mIoU %.4f mF1 %.4f", results["zero_shot"]["mIoU"], results["zero_shot"]["mF1"]
        )
    step, epoch = 0, 0
    if not trainable:
        logger.info("nothing trains (peft.method %s): evaluating only", config.peft.method)
        total_steps = 0
    progress = tqdm(total=total_steps, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    while step < total_steps:
        train_set.set_epoch(epoch)
        for batch in train_loader:
            with accelerator.accumulate(model):
                losses = training_loss(model, batch, loss_fn)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                progress.update(1)
                logged = {f"train/{k}": accelerator.reduce(v.detach(), "mean").item() for k, v in losses.items()}
                logged["train/lr"] = scheduler.get_last_lr()[0]
                accelerator.log(logged, step=step)
                if step % config.train.log_every == 0 or step == total_steps:
                    progress.set_postfix(loss=f"{logged['train/loss']:.4f}")
                    if accelerator.is_main_process:
                        with metrics_file.open("a") as f:
                            f.write(json.dumps({"step": step, "epoch": epoch, **logged}) + "\n")
                if step >= total_steps:
                    break
        epoch += 1
    progress.close()

    if val_loader is not None:
        results["final"] = evaluate(model, val_loader, processor, accelerator, categories)
        accelerator.log({"val/mIoU": results["final"]["mIoU"], "val/mF1": results["final"]["mF1"]}, step=step)
        logger.info(
            "after %d steps: val mIoU %.4f (zero-shot %.4f), mF1 %.4f (zero-shot %.4f)",
            step,
            results["final"]["mIoU"],
            results["zero_shot"]["mIoU"],
            results["final"]["mF1"],
            results["zero_shot"]["mF1"],
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = save_trained(accelerator.unwrap_model(model), processor, out / "final")
        (out / "results.json").write_text(json.dumps({"parameters": report, **results}, indent=2))
        logger.info("saved %s", final)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
