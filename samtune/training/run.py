"""One training run as a small object: set up, start, step, evaluate and keep the best, checkpoint, finish.

``samtune.train.train`` drives it; each method is one concern a reader can take alone. The state a checkpoint
saves lives in ``self.state`` (``TrainerState``); everything else is rebuilt from the config on resume.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from samtune.checkpointing import (
    TrainerState,
    load_for_resume,
    recover_run_folder,
    resolve_resume,
    save_checkpoint,
    staged_folder,
)
from samtune.click_protocol import follow_clicks, summarize
from samtune.config import MIXED_KINDS, Config, flat_values
from samtune.data.batch import NormalizedBatches, SamBatch
from samtune.data.dataset import Split
from samtune.data.geometry import normalize_on_device
from samtune.data.prompts import keep_prompt_kind
from samtune.evaluation import aggregate, predicted_masks, sam_forward, score_loader
from samtune.export.card import write_run_cards
from samtune.interactive import Rounds, training_rounds
from samtune.losses import InstanceLoss, batch_loss
from samtune.models.family import family_of, image_features
from samtune.models.loading import build_model, load_saved_weights, save_trained
from samtune.models.methods import format_report, parameter_report
from samtune.training import report
from samtune.training.folder import check_output_dir, start_output_dir
from samtune.training.setup import (
    build_cache,
    build_data,
    build_optimizer,
    build_scheduler,
    count_steps,
    fill_demo_defaults,
    make_accelerator,
)
from samtune.visualize import overlay_panel

logger = logging.getLogger("samtune.train")


class StopSignals:
    """SIGTERM / SIGINT ask every process to stop at the next step boundary (accelerate's trigger)."""

    def __init__(self, accelerator) -> None:
        self.accelerator, self.signal = accelerator, 0

    def __enter__(self) -> StopSignals:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        self.signal = signum
        self.accelerator.set_trigger()

    def requested(self) -> bool:
        return self.accelerator.check_trigger()


class LossWindow:
    """Training loss, images and instances cut away by crops / augmentation since the last log point; they stay
    on the device (no host sync per batch)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.losses = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of finite losses, their count
        self.dropped = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.images = 0
        self.since = time.perf_counter()

    def add(self, loss: torch.Tensor, finite: torch.Tensor, images: int, dropped: torch.Tensor | None = None) -> None:
        self.losses += torch.stack([torch.where(finite, loss.double(), 0.0), finite.double()])
        self.images += images
        if dropped is not None:
            self.dropped += dropped.sum().double()

    def read(self, accelerator) -> tuple[float, float, int]:
        """(mean loss, images per second, instances dropped) over every process since the last reset."""
        images = torch.tensor([self.images], dtype=torch.float64, device=self.device)
        loss, count, dropped, images = accelerator.reduce(
            torch.cat([self.losses, self.dropped, images]), "sum"
        ).tolist()
        return loss / max(count, 1), images / (time.perf_counter() - self.since), int(dropped)


class TrainingRun:
    """The accelerator, the model and its data, the optimizer, the run folder, and the state a checkpoint keeps."""

    def __init__(self, config: Config) -> None:
        train = config.train
        self.config = config
        self.accelerator = accelerator = make_accelerator(config)
        with accelerator.main_process_first():
            fill_demo_defaults(config)
        self.out = Path(config.output_dir)
        if accelerator.is_main_process:
            recover_run_folder(self.out)  # what a killed run left half-replaced (best/, final/, checkpoints)
        accelerator.wait_for_everyone()
        self.resume_from = resolve_resume(train.resume_from, self.out)
        check_output_dir(self.out, config, self.resume_from)
        set_seed(train.seed)
        model, self.processor = build_model(config.model, config.peft)
        self.parameters = parameter_report(model)
        with accelerator.main_process_first():
            self.data = build_data(config, self.processor)
        self.cache = build_cache(config, model, self.processor, self.data, self.out)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(config, self.trainable)
        self.total_steps = count_steps(
            config, len(self.data.train_loader), accelerator.num_processes, bool(self.trainable)
        )
        scheduler = build_scheduler(config, optimizer, self.total_steps)
        self.model, self.optimizer, self.train_loader, self.scheduler = accelerator.prepare(
            model, optimizer, self.data.train_loader, scheduler
        )
        self.eval_loaders = {split: accelerator.prepare(loader) for split, loader in self.data.eval_loaders.items()}
        if accelerator.is_main_process:  # only now: a run whose model or data fail to load leaves nothing behind
            start_output_dir(self.out, config, fresh=self.resume_from is None)
        accelerator.wait_for_everyone()
        accelerator.init_trackers("tensorboard", config=flat_values(config))
        self.tracker = accelerator.get_tracker("tensorboard") if accelerator.is_main_process else None
        self.rounds = Rounds(train.correction_clicks, train.mask_prompt_prob, train.mask_only_round)
        self.loss_fn = InstanceLoss(train.dice_weight, train.focal_weight, train.iou_weight, train.object_score_weight)
        self.state = TrainerState()
        self.window = LossWindow(accelerator.device)
        self.metrics_file = self.out / "metrics.jsonl"
        self.stop_reason = ""
        self.step_nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        self.grad_norm: torch.Tensor | float | None = None
        self.last_batch: SamBatch | None = None  # drawn at log points with train.log_train_images
        self.dropped = 0  # instances crops and augmentation cut away, since this process started
        self.epoch_started = time.perf_counter()
        # the training bar, a context of train(): closed (its line ended) however the run ends, errors included
        self.progress = tqdm(total=self.total_steps, desc="train", disable=not accelerator.is_local_main_process)
        val = self.eval_loaders.get(Split.VAL)
        opening = report.banner(
            config, accelerator, self.parameters, len(self.data.train_set), len(val.dataset) if val else 0,
            self.total_steps, family_of(self.model).label,
        )  # fmt: skip
        logger.info("samtune\n%s\nparameters per part:\n%s", opening, format_report(self.parameters))

    # ---------------------------------------------------------------- start

    def begin(self) -> None:
        """Resume from a checkpoint, or start a new log and score the starting weights."""
        if self.resume_from is not None:  # the newest checkpoint that loads (a broken one is named and skipped)
            self.resume_from, self.state = load_for_resume(self.accelerator, self.config.train.resume_from, self.out)
            logger.info(
                "resumed from %s at step %d (epoch %d, batch %d)",
                self.resume_from, self.state.step, self.state.epoch, self.state.batches_in_epoch,
            )  # fmt: skip
            if self.accelerator.is_main_process:  # the checkpoint's history is the truth: drop lines logged after it
                self.metrics_file.write_text("".join(json.dumps(line) + "\n" for line in self.state.history))
        else:
            if self.accelerator.is_main_process:
                self.metrics_file.write_text("")  # a new run starts a new log
                (self.out / "parameters.json").write_text(json.dumps(self.parameters, indent=2))
            zero_shot = self.validate("zero-shot")
            if zero_shot is not None:
                self.keep_best(zero_shot)  # the starting weights are a candidate too: training may not beat them
            self.score_test("test-zero-shot")
        self.progress.reset(total=self.total_steps)
        self.progress.update(self.state.step)
        self.model.train()

    # ---------------------------------------------------------------- steps

    def batches(self) -> Iterator[SamBatch]:
        """Training batches from where the run stands (mid-epoch after a resume), epoch after epoch."""
        state = self.state
        while state.step < self.total_steps:
            self.train_loader.set_epoch(state.epoch)  # the sampler's order
            self.data.train_set.set_epoch(state.epoch)  # instance subsets and prompts (accelerate sets the sampler's)
            if self.cache is not None:  # images whose embedding is cached are not read (only their annotations)
                self.data.train_set.skip_pixels(self.cache.cached_ids(Split.TRAIN))
            loader = self.train_loader
            if state.batches_in_epoch:
                loader = self.accelerator.skip_first_batches(self.train_loader, state.batches_in_epoch)
            self.epoch_started = time.perf_counter()
            for batch in loader:
                state.batches_in_epoch += 1
                yield normalize_on_device(batch)
            state.epoch_seconds.append(time.perf_counter() - self.epoch_started)
            cache = self.cache
            logger.info(
                "epoch %d took %.1f s%s", state.epoch, state.epoch_seconds[-1],
                f" (embedding cache: {cache.hits} hits, {cache.misses} misses)" if cache else "",
            )  # fmt: skip
            state.epoch += 1
            state.batches_in_epoch = 0

    def forward(self, batch: SamBatch, split: Split):
        """The model on a batch; with the cache, the image encoder only runs for images it has not seen."""
        hq_token_only = self.config.model.hq_token_only
        if self.cache is None:
            return sam_forward(self.model, batch, hq_token_only=hq_token_only)
        return sam_forward(self.model, batch, features=self.features(batch, split), hq_token_only=hq_token_only)

    def features(self, batch: SamBatch, split: Split) -> dict[str, torch.Tensor]:
        """The image encoder's features of a batch: from the cache when there is one, else computed (with
        gradients where the encoder trains)."""
        encoder = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():
            if self.cache is None:
                return image_features(encoder, batch["pixel_values"])
            return self.cache.embeddings(
                split, batch["image_id"], batch["pixel_values"],
                partial(image_features, encoder, project=self.cache.project), batch.get("has_pixels"),
            )  # fmt: skip

    def step_draws(self) -> list[int]:
        """The seed of this step's random choices (prompt kind, clicks): the same after a resume."""
        state = self.state
        return [self.config.train.seed, state.epoch, state.batches_in_epoch, self.accelerator.process_index]

    def train_loss(self, batch: SamBatch) -> torch.Tensor:
        """The step's loss: of the one forward, or the mean over the interactive rounds (so the step size does not
        grow with their number; each round's mask is scored against the same targets)."""
        if self.config.data.prompt == "mixed":  # this step's kind, reproducible on resume
            draw = np.random.default_rng(self.step_draws()[:3])
            batch = keep_prompt_kind(batch, MIXED_KINDS[draw.integers(len(MIXED_KINDS))])
        rounds = self.rounds
        if not (rounds.clicks or rounds.mask_only_round):
            return batch_loss(self.forward(batch, Split.TRAIN), batch, self.loss_fn)["loss"]
        generator = torch.Generator(device=self.accelerator.device)
        generator.manual_seed(int(np.random.SeedSequence(self.step_draws()).generate_state(1)[0]))
        history = training_rounds(
            self.model, batch, self.features(batch, Split.TRAIN), rounds, generator, self.config.model.hq_token_only
        )
        return torch.stack([batch_loss(outputs, batch, self.loss_fn)["loss"] for outputs in history]).mean()

    def train_step(self, batch: SamBatch) -> bool:
        """Forward, loss and backward of one micro-batch; True when it completed an optimizer step.

        Every process always runs backward (DDP needs them in step); a non-finite loss on any process makes every
        process drop the whole optimizer step's gradients, decided by one gather per optimizer step, not per batch.
        """
        with self.accelerator.accumulate(self.model):
            loss = self.train_loss(batch)
            finite = torch.isfinite(loss.detach())
            self.step_nonfinite |= ~finite
            self.window.add(loss.detach(), finite, batch["pixel_values"].shape[0], batch.get("dropped"))
            self.last_batch = batch
            self.accelerator.backward(loss)
            if not self.accelerator.sync_gradients:
                return False
            stepped = self.optimizer_step()
        return stepped

    def optimizer_step(self) -> bool:
        """Clip, step and schedule, unless a loss of this step was non-finite on some process."""
        train, state = self.config.train, self.state
        skip = bool(self.accelerator.gather(self.step_nonfinite[None]).any())
        self.step_nonfinite.zero_()
        if skip:
            self.optimizer.zero_grad()
            state.nonfinite_in_a_row += 1
            state.nonfinite_total += 1
            logger.warning(
                "non-finite loss at step %d: step skipped (%d in a row, %d in all)",
                state.step + 1, state.nonfinite_in_a_row, state.nonfinite_total,
            )  # fmt: skip
            if state.nonfinite_in_a_row >= train.max_nonfinite:
                raise RuntimeError(
                    f"{state.nonfinite_in_a_row} non-finite losses in a row at step {state.step}: stopping. "
                    "Lower train.lr, use train.mixed_precision bf16 instead of fp16, or check the data."
                )
            return False
        if train.max_grad_norm > 0:
            self.grad_norm = self.accelerator.clip_grad_norm_(self.trainable, train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        state.nonfinite_in_a_row = 0
        state.step += 1
        self.progress.update(1)
        return True

    def after_step(self, signals: StopSignals) -> None:
        """After an optimizer step: log, validate and keep the best, checkpoint, and decide whether to stop."""
        train, step = self.config.train, self.state.step
        if step % train.log_every == 0 or step == self.total_steps:
            self.log_training()
        if train.eval_every and step % train.eval_every == 0 and step < self.total_steps:
            metrics = self.validate("eval", self.state.last_train_loss)
            if metrics is not None:
                self.keep_best(metrics)
                if train.early_stopping and self.state.evals_without_improvement >= train.early_stopping:
                    criterion = "mIoU" if train.select_on == "mIoU" else "click-curve mean"
                    self.stop_reason = (
                        f"early stopping: no better val {criterion} in {train.early_stopping} evaluations"
                    )
        if train.save_every and step % train.save_every == 0:
            save_checkpoint(self.accelerator, self.state, self.out, train.keep_checkpoints)
        self.check_signals(signals)
        if not self.stop_reason and train.stop_at and self.total_steps > step >= train.stop_at:
            self.stop_reason = f"train.stop_at {train.stop_at}"
        if step >= self.total_steps and not self.stop_reason:  # the last epoch, whole or cut short by max_steps
            self.state.epoch_seconds.append(time.perf_counter() - self.epoch_started)

    def check_signals(self, signals: StopSignals) -> None:
        """A SIGTERM / SIGINT on any process stops every process here (a step boundary, or after the first
        evaluations)."""
        if signals.requested():
            self.stop_reason = f"signal {signal.Signals(signals.signal).name if signals.signal else 'on another rank'}"

    @property
    def done(self) -> bool:
        return bool(self.stop_reason) or self.state.step >= self.total_steps

    def log_training(self) -> None:
        loss, images_per_s, dropped = self.window.read(self.accelerator)
        logged = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0], "train/images_per_s": images_per_s}
        if self.grad_norm is not None:
            logged["train/grad_norm"] = float(self.grad_norm)
        if self.config.data.crop_size or self.data.train_set.augment.active:
            logged["train/dropped_instances"] = dropped
            self.dropped += dropped
        self.accelerator.log(logged, step=self.state.step)
        if self.config.train.log_train_images and self.last_batch is not None:
            self.log_train_panels(self.last_batch, self.config.train.log_train_images)
        self.progress.set_postfix(loss=f"{loss:.4f}")
        self.window.reset()
        self.state.last_train_loss = loss

    def log_train_panels(self, batch: SamBatch, count: int) -> None:
        """The first ``count`` samples of a training batch as the model saw them (augmented, cropped), with their
        targets and the model's masks for their prompts, to TensorBoard as ``train/sample_N`` panels."""
        with torch.no_grad():
            logits, _ = predicted_masks(self.forward(batch, Split.TRAIN))
        if not self.accelerator.is_main_process:
            return
        side = batch["pixel_values"].shape[-1]
        for row in range(min(count, len(batch["image_id"]))):
            height, width = (int(v) for v in batch["reshaped_input_sizes"][row])
            targets = batch["low_res_masks"][row][batch["valid"][row]].float().cpu()
            # the low-resolution targets in the input frame, cropped to the image (overlay_panel's "original size")
            truth = torch.nn.functional.interpolate(targets[None], size=(side, side), mode="nearest")[0]
            shown = {**batch, "original_masks": [None] * row + [truth[:, :height, :width].bool()]}
            points = None
            if "input_points" in batch:
                valid = batch["valid"][row].cpu()
                xy = batch["input_points"][row][valid].reshape(-1, 2).cpu()
                labels = batch["input_labels"][row][valid].reshape(-1, 1).cpu().float()
                points = torch.cat([xy, labels], dim=1).numpy()
                points = points[points[:, 2] >= 0]
            panel = overlay_panel(shown, row, logits, self.processor, points)
            self.tracker.writer.add_image(f"train/sample_{row}", panel, global_step=self.state.step, dataformats="HWC")

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, split: Split, overlays: int = 0) -> tuple[dict, list]:
        """Metrics over a whole split (each instance once, whatever the process count), and overlay panels as
        (TensorBoard tag, image); with ``train.eval_clicks``, also the click protocol's ``clicks`` entry and
        panels of its last round with the clicks drawn."""
        panels: list = []
        clicks, hq_token_only = self.config.train.eval_clicks, self.config.model.hq_token_only
        click_records: list[dict] = []
        click_panels: list = []
        drawing = bool(overlays) and self.accelerator.is_main_process

        def draw(batch: SamBatch, outputs) -> None:
            logits, _ = predicted_masks(outputs)
            for row in range(min(overlays - len(panels), len(batch["image_id"]))):
                panels.append(overlay_panel(batch, row, logits, self.processor))

        def forward(batch: SamBatch):
            if not clicks:
                return self.forward(batch, split)
            features = self.features(batch, split)  # one encoder pass for the first prompt and every click
            outputs = sam_forward(self.model, batch, features=features, hq_token_only=hq_token_only)
            run = follow_clicks(self.model, batch, self.processor, clicks, features, outputs, hq_token_only)
            click_records.extend(run.records)
            for row in range(min(overlays - len(click_panels), len(batch["image_id"])) if drawing else 0):
                click_panels.append(overlay_panel(batch, row, run.logits, self.processor, run.points[row]))
            return outputs

        self.model.eval()
        records = score_loader(
            NormalizedBatches(self.eval_loaders[split]),
            forward,
            self.processor,
            on_batch=draw if drawing else None,
            progress=self.accelerator.is_local_main_process,
        )
        self.model.train()
        # Each rank scored its shard; samples the sampler repeated to even out shards collapse on their ids.
        metrics = aggregate(gather_object(records), self.data.categories[split])
        if clicks:
            metrics["clicks"] = summarize(gather_object(click_records), clicks)
        tagged = [(f"overlay_{i}", panel) for i, panel in enumerate(panels)]
        return metrics, tagged + [(f"clicks_overlay_{i}", panel) for i, panel in enumerate(click_panels)]

    def record(self, kind: str, metrics: dict, panels: list, train_loss: float | None, split: Split) -> None:
        """One line of metrics.jsonl (and of the checkpointed history), TensorBoard scalars and overlays."""
        line = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "kind": kind,
            "train_loss": train_loss,
            **{k: v for k, v in metrics.items() if k != "per_category"},
            "per_category": metrics.get("per_category"),
        }
        self.state.history.append(line)
        scalars = {f"{split.value}/{k}": v for k, v in metrics.items() if isinstance(v, float)}
        curve = metrics.get("clicks")
        if curve:
            scalars.update({f"{split.value}/clicks_mIoU_{k}": v for k, v in enumerate(curve["mIoU"])})
            scalars.update({f"{split.value}/{k}": v for k, v in curve.items() if k.startswith(("NoC", "failed"))})
        self.accelerator.log(scalars, step=self.state.step)
        if self.accelerator.is_main_process:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps(line) + "\n")
            for name, panel in panels:
                tag = f"{split.value}/{name}"
                self.tracker.writer.add_image(tag, panel, global_step=self.state.step, dataformats="HWC")

    def validate(self, kind: str, train_loss: float | None = None) -> dict | None:
        if Split.VAL not in self.eval_loaders:
            return None
        metrics, panels = self.evaluate(Split.VAL, self.config.train.log_images)
        self.record(kind, metrics, panels, train_loss, Split.VAL)
        logger.info(
            "step %d %s: val mIoU %.4f mF1 %.4f (%d instances)",
            self.state.step, kind, metrics["mIoU"], metrics["mF1"], metrics["num_instances"],
        )  # fmt: skip
        if "clicks" in metrics:
            curve = metrics["clicks"]
            logger.info(
                "step %d %s: val mIoU after 0..%d clicks %s, NoC85 %.2f, NoC90 %.2f",
                self.state.step, kind, len(curve["mIoU"]) - 1, " ".join(f"{v:.4f}" for v in curve["mIoU"]),
                curve.get("NoC85", float("nan")), curve.get("NoC90", float("nan")),
            )  # fmt: skip
        return metrics

    def score_test(self, kind: str) -> dict | None:
        """The held-out split: scored only at the start and with the weights validation selected."""
        if Split.TEST not in self.eval_loaders:
            return None
        metrics, _ = self.evaluate(Split.TEST)
        self.record(kind, metrics, [], None, Split.TEST)
        logger.info("step %d %s: test mIoU %.4f mF1 %.4f", self.state.step, kind, metrics["mIoU"], metrics["mF1"])
        return metrics

    def selection_value(self, metrics: dict) -> float:
        """What best/ and early stopping compare (``train.select_on``): val mIoU, or the mean of the click curve."""
        if self.config.train.select_on == "clicks":
            return metrics["clicks"]["mIoU_mean"]
        return metrics["mIoU"]

    def keep_best(self, metrics: dict) -> None:
        """Save these weights as best/ if their selection value beats the best so far (NaN never does);
        ``state.best_miou`` holds the best selection value."""
        state = self.state
        value = self.selection_value(metrics)
        if not value > state.best_miou:
            state.evals_without_improvement += 1
            return
        state.best_miou, state.best_step, state.evals_without_improvement = value, state.step, 0
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            saved = {"step": state.step, "selected_on": self.config.train.select_on, "selected_value": value}
            with staged_folder(self.out / "best") as scratch:  # a kill leaves the old best/ or the new one
                save_trained(self.accelerator.unwrap_model(self.model), self.processor, scratch)
                (scratch / "metrics.json").write_text(json.dumps({**saved, **metrics}, indent=2))

    # ---------------------------------------------------------------- end

    @property
    def interrupted(self) -> bool:
        return bool(self.stop_reason) and not self.stop_reason.startswith("early stopping")

    def finish(self) -> dict:
        """An interrupted run leaves a checkpoint; a finished one final/, the test scores and results.json."""
        results: dict = {"interrupted": self.interrupted, "stop_reason": self.stop_reason}
        if self.interrupted:
            path = save_checkpoint(self.accelerator, self.state, self.out, self.config.train.keep_checkpoints)
            logger.info(
                "stopped at step %d (%s); resume with --train.resume_from latest (checkpoint %s)",
                self.state.step, self.stop_reason, path,
            )  # fmt: skip
        else:
            results.update(self.final_scores())
            if self.accelerator.is_main_process:
                (self.out / "results.json").write_text(json.dumps(self.summary(results), indent=2))
                write_run_cards(self.out)  # samtune's card in best/ and final/, in place of PEFT's template
                logger.info("done\n%s", report.closing_table(self.state, results, self.out))
        self.accelerator.end_training()
        return results

    def _history(self, kind: str) -> dict | None:
        return next((line for line in self.state.history if line["kind"] == kind), None)

    def final_validation(self) -> dict | None:
        """Val metrics of the final weights; reuses an evaluation of these very weights instead of a second pass."""
        validations = [line for line in self.state.history if not line["kind"].startswith("test")]
        last = validations[-1] if validations else None
        if not self.total_steps:
            return self._history("zero-shot")
        if last is not None and last["step"] == self.state.step:
            metrics = {k: v for k, v in last.items() if k not in ("step", "epoch", "kind", "train_loss")}
            self.record("final", metrics, [], self.state.last_train_loss, Split.VAL)
            return metrics
        metrics = self.validate("final", self.state.last_train_loss)
        if metrics is not None:
            self.keep_best(metrics)
        return metrics

    def final_scores(self) -> dict:
        """Final val metrics, final/ saved, and the test split scored with the weights validation selected."""
        state = self.state
        results = {"zero_shot": self._history("zero-shot"), "final": self.final_validation()}
        results["ranks_in_sync"] = report.ranks_in_sync(self.accelerator, self.model)
        results["best_step"] = state.best_step
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with staged_folder(self.out / "final") as scratch:
                save_trained(self.accelerator.unwrap_model(self.model), self.processor, scratch)
        self.accelerator.wait_for_everyone()
        if Split.TEST in self.eval_loaders:
            if state.best_step >= 0 and state.best_step != state.step:
                load_saved_weights(self.accelerator.unwrap_model(self.model), self.out / "best")
            results["test"] = {
                "zero_shot": self._history("test-zero-shot"),
                "best": self.score_test("test-best"),
                "weights_step": state.best_step if state.best_step >= 0 else state.step,
            }
        results["peak_memory_gib"] = report.peak_memory_gib(self.accelerator.device)
        return results

    def best_miou(self) -> float:
        """Val mIoU of the weights in best/ (from that evaluation's line: ``state.best_miou`` is what was compared)."""
        line = report.best_line(self.state)
        return line["mIoU"] if line else self.state.best_miou

    def summary(self, results: dict) -> dict:
        """results.json: the parameter report, steps, best, non-finite steps, epoch times, cache use, results."""
        state, cache = self.state, self.cache
        return {
            "parameters": self.parameters,
            "steps": state.step,
            "best_step": state.best_step,
            "best_mIoU": self.best_miou() if state.best_step >= 0 else None,
            "select_on": self.config.train.select_on,
            "best_selected_value": state.best_miou if state.best_step >= 0 else None,
            "nonfinite_steps": state.nonfinite_total,
            "epoch_seconds": state.epoch_seconds,
            "embedding_cache": {"hits": cache.hits, "misses": cache.misses} if cache else None,
            "dropped_instances": self.dropped,
            **results,
        }
