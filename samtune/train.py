"""Fine-tune a SAM checkpoint on COCO instance masks.

    accelerate launch samtune/train.py [--config FILE.yaml] [--section.key value ...]

With no data or model given it runs the built-in offline demo (a small SAM and
synthetic shapes, made on first use). Every key is listed below with its default.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repository, not samtune/, on the path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from samtune.checkpointing import TrainerState, load_checkpoint, resolve_resume, save_checkpoint
from samtune.config import Config, ConfigError, parse_args, save_config
from samtune.data import CocoInstanceDataset, SamPromptDataset, make_loader
from samtune.demo import DEMO_RUN, prepare_demo
from samtune.embedding_cache import EmbeddingCache, estimate_bytes, why_not_cacheable
from samtune.evaluation import PROMPT_KEYS, aggregate, predicted_masks, sam_forward, score_batch, uses_multimask
from samtune.losses import InstanceLoss, batch_loss
from samtune.modeling import build_model, format_report, load_saved_weights, parameter_report, save_trained
from samtune.prompts import MIXED_KINDS, PromptConfig, keep_prompt_kind
from samtune.visualize import overlay_panel

logger = logging.getLogger("samtune.train")


def parse_config(argv: list[str] | None = None) -> Config:
    """The run's config; with neither model nor training data given, the demo's settings under the user's keys."""
    config = parse_args(argv, description=__doc__)
    if not config.model.name_or_path and not config.data.train_annotations:
        config = parse_args(argv, description=__doc__, base=DEMO_RUN)
    return config


def fill_demo_defaults(config: Config) -> None:
    """Point empty model / data keys at the built-in demo (demo val / test data only with demo training data)."""
    if config.model.name_or_path and config.data.train_annotations:
        return
    demo = prepare_demo()
    if not config.model.name_or_path:
        config.model.name_or_path = str(demo.model)
    if not config.data.train_annotations:
        data = config.data
        data.train_annotations, data.train_images = str(demo.train_annotations), str(demo.train_images)
        if not data.val_annotations:
            data.val_annotations, data.val_images = str(demo.val_annotations), str(demo.val_images)
        if not data.test_annotations:
            data.test_annotations, data.test_images = str(demo.test_annotations), str(demo.test_images)


def build_loaders(config: Config, processor):
    data, seed = config.data, config.train.seed
    prompt = PromptConfig(data.prompt, data.box_jitter, data.num_points, data.num_negative_points)
    train_source = CocoInstanceDataset(data.train_annotations, data.train_images, data.check_images)
    train_set = SamPromptDataset(train_source, processor, prompt, data.max_instances, train=True, seed=seed)
    train_loader = make_loader(train_set, config.train.batch_size, data.num_workers, seed=seed)
    val_loader, test_loader, categories = None, None, train_source.categories
    if data.val_annotations:
        val_source = CocoInstanceDataset(data.val_annotations, data.val_images, data.check_images)
        val_set = SamPromptDataset(val_source, processor, prompt, data.max_instances, train=False)
        val_loader = make_loader(val_set, config.train.batch_size, data.num_workers)
        categories = val_source.categories
    if data.test_annotations:
        test_source = CocoInstanceDataset(data.test_annotations, data.test_images, data.check_images)
        test_set = SamPromptDataset(test_source, processor, prompt, data.max_instances, train=False)
        test_loader = make_loader(test_set, config.train.batch_size, data.num_workers)
    return train_set, train_loader, val_loader, test_loader, categories


def build_cache(config: Config, model, processor, train_set, eval_loaders: list, out: Path) -> EmbeddingCache | None:
    """An embedding cache when the encoder is frozen and the user did not opt out; the log says which and why."""
    if not config.data.cache_embeddings:
        logger.info("image embeddings: recomputed every step (data.cache_embeddings is false)")
        return None
    reason = why_not_cacheable(model)
    if reason:
        logger.info("image embeddings: recomputed every step, not cached, because %s", reason)
        return None
    # split numbers: 0 train, 1 val, 2 test
    sources = {0: train_set.source}
    sources.update({split: loader.dataset.source for split, loader in enumerate(eval_loaders, 1) if loader is not None})
    size = estimate_bytes(model, sum(len(source) for source in sources.values()))
    folder = config.data.embedding_cache_dir or None
    if folder is None and size > config.data.embedding_cache_memory_gb * 1e9:
        folder = out / "embedding-cache"
    cache = EmbeddingCache(model, processor, folder)
    for split, source in sources.items():
        cache.register(split, {image.image_id: image.path for image in source.images})
    logger.info(
        "image embeddings: cached (%s, about %.2f GB): the image encoder runs once per image",
        f"in {cache.folder}" if cache.folder else "in memory",
        size / 1e9,
    )
    return cache


def build_optimizer(config: Config, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    train = config.train
    # an optimizer needs at least one tensor; with nothing to train (method none) it never steps
    parameters = parameters or [torch.nn.Parameter(torch.zeros(1))]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise ConfigError("train.optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizer states)")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=train.lr, weight_decay=train.weight_decay)
    raise ConfigError(f"train.optimizer must be adamw or adamw8bit, got {train.optimizer!r}")


def evaluate(
    model, loader, processor, accelerator: Accelerator, categories: dict[int, str], images: int = 0, forward=None
):
    """Metrics over the whole validation split (each instance once, whatever the process count), and overlays."""
    model.eval()
    forward = forward or (lambda batch: sam_forward(model, batch))
    records, panels = [], []
    for batch in tqdm(loader, desc="eval", disable=not accelerator.is_local_main_process, leave=False):
        with torch.no_grad():
            outputs = forward(batch)
        records += score_batch(outputs, batch, processor)
        if accelerator.is_main_process and len(panels) < images:
            logits, _ = predicted_masks(outputs)
            for row in range(min(images - len(panels), len(batch["image_id"]))):
                panels.append(overlay_panel(batch, row, logits, processor))
    model.train()
    # Each rank scored its shard; samples the sampler repeated to even out shards collapse on their ids.
    return aggregate(gather_object(records), categories), panels


class Stopper:
    """SIGTERM / SIGINT ask every process to stop at the next step boundary (accelerate's trigger)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator, self.signal = accelerator, 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame) -> None:
        self.signal = signum
        self.accelerator.set_trigger()

    def requested(self) -> bool:
        return self.accelerator.check_trigger()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def banner(config: Config, accelerator: Accelerator, report: dict, train_set, val_loader, total_steps: int) -> str:
    val = len(val_loader.dataset) if val_loader is not None else 0
    return "\n".join(
        [
            f"model      {config.model.name_or_path}",
            f"method     {config.peft.method} (targets {config.peft.targets}, rank {config.peft.rank})"
            if config.peft.method in ("lora", "dora", "qlora", "qdora")
            else f"method     {config.peft.method}",
            f"trainable  {report['all']['trainable']:,} of {report['all']['total']:,} parameters",
            f"data       {len(train_set)} training images ({config.data.prompt} prompts), {val} validation samples",
            f"devices    {accelerator.num_processes} x {accelerator.device.type}, "
            f"precision {accelerator.mixed_precision}",
            f"steps      {total_steps} ({config.train.batch_size} images x {config.train.grad_accum} accumulation x "
            f"{accelerator.num_processes} processes per step)",
            f"output     {config.output_dir}",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(argv)
    train_cfg = config.train
    accelerator = Accelerator(
        # no GPU: CPU processes (gloo) even under --multi_gpu, as the 2-process CPU test runs
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=train_cfg.grad_accum,
        mixed_precision=train_cfg.mixed_precision or None,
        log_with="tensorboard",
        project_dir=config.output_dir,
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, at any process count
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_cfg.seed),
    )
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with accelerator.main_process_first():
        fill_demo_defaults(config)
    out = Path(config.output_dir)
    resume = resolve_resume(train_cfg.resume_from, out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    set_seed(train_cfg.seed)

    model, processor = build_model(config.model, config.peft)
    report = parameter_report(model)
    with accelerator.main_process_first():
        train_set, train_loader, val_loader, test_loader, categories = build_loaders(config, processor)
    cache = build_cache(config, model, processor, train_set, [val_loader, test_loader], out)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, trainable)
    steps_per_epoch = math.ceil(len(train_loader) / (train_cfg.grad_accum * accelerator.num_processes))
    total_steps = (train_cfg.max_steps or steps_per_epoch * train_cfg.epochs) if trainable else 0
    scheduler = get_scheduler(
        train_cfg.scheduler,
        optimizer,
        num_warmup_steps=int(train_cfg.warmup_ratio * total_steps),
        num_training_steps=max(total_steps, 1),
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    if test_loader is not None:
        test_loader = accelerator.prepare(test_loader)
    accelerator.init_trackers("tensorboard", config={k: str(v) for k, v in vars(train_cfg).items()})
    tracker = accelerator.get_tracker("tensorboard") if accelerator.is_main_process else None
    loss_fn = InstanceLoss(train_cfg.dice_weight, train_cfg.focal_weight, train_cfg.iou_weight)
    encoder = accelerator.unwrap_model(model)

    def forward(batch: dict, split: int):
        """The model on a batch; with the cache, the image encoder only runs for images it has not seen."""
        if split == 0 and config.data.prompt == "mixed":  # this step's prompt kind, reproducible on resume
            draw = np.random.default_rng([train_cfg.seed, state.epoch, state.batches_in_epoch])
            batch = keep_prompt_kind(batch, MIXED_KINDS[draw.integers(len(MIXED_KINDS))])
        if cache is None:
            return sam_forward(model, batch)
        with accelerator.autocast():
            embeddings = cache.embeddings(split, batch["image_id"], batch["pixel_values"], encoder.get_image_embeddings)
        prompts = {key: batch[key] for key in PROMPT_KEYS if key in batch}
        return model(image_embeddings=embeddings, multimask_output=uses_multimask(batch), **prompts)

    logger.info(
        "samtune\n%s\nparameters per part:\n%s",
        banner(config, accelerator, report, train_set, val_loader, total_steps),
        format_report(report),
    )

    state = TrainerState()
    metrics_file = out / "metrics.jsonl"
    if resume is not None:
        state = load_checkpoint(accelerator, resume)
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)", resume, state.step, state.epoch, state.batches_in_epoch
        )
        if accelerator.is_main_process:  # the checkpoint's history is the truth: drop lines logged after it
            metrics_file.write_text("".join(json.dumps(line) + "\n" for line in state.history))
    elif accelerator.is_main_process:
        metrics_file.write_text("")  # a new run starts a new log
        (out / "parameters.json").write_text(json.dumps(report, indent=2))

    def record(kind: str, metrics: dict, panels: list, train_loss: float | None, split: str = "val") -> None:
        line = {
            "step": state.step,
            "epoch": state.epoch,
            "kind": kind,
            "train_loss": train_loss,
            **{k: v for k, v in metrics.items() if k != "per_category"},
            "per_category": metrics.get("per_category"),
        }
        state.history.append(line)
        accelerator.log({f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=state.step)
        if accelerator.is_main_process:
            with metrics_file.open("a") as f:
                f.write(json.dumps(line) + "\n")
            for index, panel in enumerate(panels):
                tracker.writer.add_image(f"{split}/overlay_{index}", panel, global_step=state.step, dataformats="HWC")

    def validate(kind: str, train_loss: float | None) -> dict | None:
        if val_loader is None:
            return None
        metrics, panels = evaluate(
            model,
            val_loader,
            processor,
            accelerator,
            categories,
            train_cfg.log_images,
            forward=lambda batch: forward(batch, 1),
        )
        record(kind, metrics, panels, train_loss)
        logger.info(
            "step %d %s: val mIoU %.4f mF1 %.4f (%d instances)",
            state.step,
            kind,
            metrics["mIoU"],
            metrics["mF1"],
            metrics["num_instances"],
        )
        return metrics

    def save_best(metrics: dict) -> None:
        if metrics["mIoU"] <= state.best_miou:
            state.evals_without_improvement += 1
            return
        state.best_miou, state.best_step, state.evals_without_improvement = metrics["mIoU"], state.step, 0
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            scratch = out / ".best.partial"
            shutil.rmtree(scratch, ignore_errors=True)
            save_trained(accelerator.unwrap_model(model), processor, scratch)
            (scratch / "metrics.json").write_text(json.dumps({"step": state.step, **metrics}, indent=2))
            shutil.rmtree(out / "best", ignore_errors=True)
            scratch.rename(out / "best")

    def test(kind: str) -> dict | None:
        """The held-out split: scored only at the start and with the weights validation selected."""
        if test_loader is None:
            return None
        metrics, _ = evaluate(model, test_loader, processor, accelerator, categories, forward=lambda b: forward(b, 2))
        record(kind, metrics, [], None, split="test")
        logger.info("step %d %s: test mIoU %.4f mF1 %.4f", state.step, kind, metrics["mIoU"], metrics["mF1"])
        return metrics

    zero_shot = validate("zero-shot", None) if resume is None else None
    if zero_shot is not None:
        save_best(zero_shot)  # the starting weights are a candidate too: training may not beat them
    if resume is None:
        test("test-zero-shot")
    stopper = Stopper(accelerator)
    progress = tqdm(total=total_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process)
    window = {"loss": 0.0, "count": 0, "images": 0, "since": time.perf_counter()}
    skip_step, stop_reason, grad_norm = False, "", None
    model.train()
    while state.step < total_steps and not stop_reason:
        train_loader.set_epoch(state.epoch)  # the sampler's order
        train_set.set_epoch(state.epoch)  # instance subsets and prompts (accelerate only sets the sampler's)
        loader, epoch_start = train_loader, time.perf_counter()
        if state.batches_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        for batch in loader:
            state.batches_in_epoch += 1
            with accelerator.accumulate(model):
                losses = batch_loss(forward(batch, 0), batch, loss_fn)
                finite = accelerator.gather(torch.isfinite(losses["loss"].detach()).float()[None]).min() > 0
                if finite:
                    accelerator.backward(losses["loss"])
                    window["loss"] += losses["loss"].item()
                    window["count"] += 1
                else:
                    skip_step = True  # every process agrees, so no process waits on another's gradients
                window["images"] += batch["pixel_values"].shape[0]
                if accelerator.sync_gradients:
                    if skip_step:
                        optimizer.zero_grad()
                        state.nonfinite_in_a_row += 1
                        state.nonfinite_total += 1
                        logger.warning(
                            "non-finite loss at step %d: step skipped (%d in a row, %d in all)",
                            state.step + 1,
                            state.nonfinite_in_a_row,
                            state.nonfinite_total,
                        )
                    else:
                        if train_cfg.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if skip_step:
                skip_step = False
                if state.nonfinite_in_a_row >= train_cfg.max_nonfinite:
                    raise RuntimeError(
                        f"{state.nonfinite_in_a_row} non-finite losses in a row at step {state.step}: stopping. "
                        "Lower train.lr, use train.mixed_precision bf16 instead of fp16, or check the data."
                    )
                continue
            state.nonfinite_in_a_row = 0
            state.step += 1
            progress.update(1)
            if state.step % train_cfg.log_every == 0 or state.step == total_steps:
                totals = accelerator.reduce(
                    torch.tensor([window["loss"], window["count"], window["images"]], device=accelerator.device), "sum"
                )
                seconds = time.perf_counter() - window["since"]
                logged = {
                    "train/loss": (totals[0] / totals[1].clamp(min=1)).item(),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/images_per_s": totals[2].item() / seconds,
                }
                if grad_norm is not None:
                    logged["train/grad_norm"] = float(grad_norm)
                accelerator.log(logged, step=state.step)
                progress.set_postfix(loss=f"{logged['train/loss']:.4f}")
                window.update(loss=0.0, count=0, images=0, since=time.perf_counter())
                state.last_train_loss = logged["train/loss"]
            if train_cfg.eval_every and state.step % train_cfg.eval_every == 0 and state.step < total_steps:
                metrics = validate("eval", state.last_train_loss)
                if metrics is not None:
                    save_best(metrics)
                    if train_cfg.early_stopping and state.evals_without_improvement >= train_cfg.early_stopping:
                        stop_reason = f"early stopping: no better val mIoU in {train_cfg.early_stopping} evaluations"
            if train_cfg.save_every and state.step % train_cfg.save_every == 0:
                save_checkpoint(accelerator, state, out, train_cfg.keep_checkpoints)
            if stopper.requested():
                stop_reason = f"signal {signal.Signals(stopper.signal).name if stopper.signal else 'on another rank'}"
            elif train_cfg.stop_at and state.step >= train_cfg.stop_at and state.step < total_steps:
                stop_reason = f"train.stop_at {train_cfg.stop_at}"
            if stop_reason or state.step >= total_steps:
                if not stop_reason:  # the last epoch, whole or cut short by train.max_steps
                    state.epoch_seconds.append(time.perf_counter() - epoch_start)
                break
        else:
            state.epoch_seconds.append(time.perf_counter() - epoch_start)
            logger.info(
                "epoch %d took %.1f s%s",
                state.epoch,
                state.epoch_seconds[-1],
                f" (embedding cache: {cache.hits} hits, {cache.misses} misses)" if cache else "",
            )
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()
    stopper.restore()

    interrupted = bool(stop_reason) and not stop_reason.startswith("early stopping")
    results: dict = {"interrupted": interrupted, "stop_reason": stop_reason}
    if interrupted:
        path = save_checkpoint(accelerator, state, out, train_cfg.keep_checkpoints)
        logger.info(
            "stopped at step %d (%s); resume with --train.resume_from latest (checkpoint %s)",
            state.step,
            stop_reason,
            path,
        )
    else:
        validations = [h for h in state.history if not h["kind"].startswith("test")]
        last = validations[-1] if validations else None
        if not total_steps:
            metrics = zero_shot
        elif last is not None and last["step"] == state.step:  # just evaluated these weights: no second pass
            metrics = {k: v for k, v in last.items() if k not in ("step", "epoch", "kind", "train_loss")}
            record("final", metrics, [], state.last_train_loss)
        else:
            metrics = validate("final", state.last_train_loss)
            if metrics is not None:
                save_best(metrics)
        results.update(zero_shot=next((h for h in state.history if h["kind"] == "zero-shot"), None), final=metrics)
        results["ranks_in_sync"] = ranks_in_sync(accelerator, model)
        results["best_step"] = state.best_step
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_trained(accelerator.unwrap_model(model), processor, out / "final")
        accelerator.wait_for_everyone()
        if test_loader is not None:
            if state.best_step >= 0 and state.best_step != state.step:
                load_saved_weights(accelerator.unwrap_model(model), out / "best")
            results["test"] = {
                "zero_shot": next((h for h in state.history if h["kind"] == "test-zero-shot"), None),
                "best": test("test-best"),
                "weights_step": state.best_step if state.best_step >= 0 else state.step,
            }
        results["peak_memory_gb"] = peak_memory_gb(accelerator.device)
        if accelerator.is_main_process:
            summary = {
                "parameters": report,
                "steps": state.step,
                "best_step": state.best_step,
                "best_mIoU": state.best_miou if state.best_step >= 0 else None,
                "nonfinite_steps": state.nonfinite_total,
                "epoch_seconds": state.epoch_seconds,
                "embedding_cache": {"hits": cache.hits, "misses": cache.misses} if cache else None,
                **results,
            }
            (out / "results.json").write_text(json.dumps(summary, indent=2))
            logger.info("done\n%s", closing_table(state, results, out))
    accelerator.end_training()
    if interrupted and stopper.signal:
        sys.exit(128 + stopper.signal)
    return results


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def ranks_in_sync(accelerator: Accelerator, model) -> bool:
    """Whether every process ends with the same trainable weights (a cheap checksum, gathered)."""
    with torch.no_grad():
        values = [p.detach().float().sum() for p in model.parameters() if p.requires_grad]
        checksum = torch.stack(values).to(accelerator.device) if values else torch.zeros(1, device=accelerator.device)
    gathered = accelerator.gather(checksum[None]).cpu().numpy()
    return bool(np.all(gathered == gathered[0]))


def closing_table(state: TrainerState, results: dict, out: Path) -> str:
    def row(name: str, metrics: dict | None) -> list[str]:
        if not metrics:
            return []
        f1 = f"{100 * metrics['mF1']:>8.2f}" if "mF1" in metrics else ""
        return [f"{name:<26}{100 * metrics['mIoU']:>8.2f}{f1}"]

    test = results.get("test") or {}
    rows = [
        *row("val zero-shot", results.get("zero_shot")),
        *row(f"val final (step {state.step})", results.get("final")),
        *(row(f"val best (step {state.best_step})", {"mIoU": state.best_miou}) if state.best_step >= 0 else []),
        *row("test zero-shot", test.get("zero_shot")),
        *row(f"test fine-tuned (step {test.get('weights_step')})", test.get("best")),
    ]
    header = f"{'':<26}{'mIoU %':>8}{'mF1 %':>8}"
    where = f"weights: {out / 'final'}" + (f", {out / 'best'}" if state.best_step >= 0 else "")
    return "\n".join([header, *rows, where, f"metrics: {out / 'metrics.jsonl'}; tensorboard --logdir {out}"])


if __name__ == "__main__":
    main()
