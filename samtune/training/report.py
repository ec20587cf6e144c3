"""What a run tells its user: the opening banner, the results summary, the closing table, and two checks."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from samtune.checkpointing import TrainerState
from samtune.config import ADAPTER_METHODS, Config
from samtune.data.augment import PRESETS, settings_of


def banner(
    config: Config,
    accelerator: Accelerator,
    report: dict,
    train_images: int,
    val_samples: int,
    steps: int,
    family: str = "SAM",
) -> str:
    method = config.peft.method
    if method in ADAPTER_METHODS:
        method += f" (targets {config.peft.targets}, rank {config.peft.rank})"
    return "\n".join(
        [
            f"model      {config.model.name_or_path} ({family})",
            f"method     {method}",
            f"trainable  {report['all']['trainable']:,} of {report['all']['total']:,} parameters",
            f"data       {train_images} training images ({training_view(config)}), {val_samples} validation samples",
            f"devices    {accelerator.num_processes} x {accelerator.device.type}, "
            f"precision {accelerator.mixed_precision}",
            f"steps      {steps} ({config.train.batch_size} images x {config.train.grad_accum} accumulation x "
            f"{accelerator.num_processes} processes per step)",
            f"output     {config.output_dir}",
        ]
    )


def training_view(config: Config) -> str:
    """How training sees its images: the prompts, and the augmentation and crops when there are any."""
    parts = [f"{config.data.prompt} prompts"]
    settings = settings_of(config.data)
    if settings.active:
        own = "" if settings == PRESETS[config.data.augment] else " + data.augment_* keys"
        parts.append(f"augment {config.data.augment}{own}")
    if config.data.crop_size:
        parts.append(f"{config.data.crop_size} px crops")
    return ", ".join(parts)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or on CPU the process's peak resident memory, in GiB (2**30 bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def _full_parameters(model: torch.nn.Module):
    """The model's whole parameters on every process: FSDP gathers its shards first (FSDP2's are DTensors)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()


def ranks_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Whether every process ends with the same trainable weights (a checksum of the full weights, gathered)."""
    with torch.no_grad(), _full_parameters(model):
        values = [
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().sum()
            for p in model.parameters()
            if p.requires_grad
        ]
        checksum = torch.stack(values).to(accelerator.device) if values else torch.zeros(1, device=accelerator.device)
    gathered = accelerator.gather(checksum[None]).cpu().numpy()
    return bool(np.all(gathered == gathered[0]))


def best_line(state: TrainerState) -> dict | None:
    """The val line of the weights in best/ (``state.best_miou`` is what was compared: with ``train.select_on``
    clicks, the click curve's mean)."""
    return next(
        (line for line in state.history if line["step"] == state.best_step and not line["kind"].startswith("test")),
        None,
    )


def closing_table(state: TrainerState, results: dict, out: Path) -> str:
    def row(name: str, metrics: dict | None) -> list[str]:
        if not metrics:
            return []
        f1 = f"{100 * metrics['mF1']:>8.2f}" if "mF1" in metrics else ""
        return [f"{name:<26}{100 * metrics['mIoU']:>8.2f}{f1}"]

    test = results.get("test") or {}
    best = best_line(state)
    rows = [
        *row("val zero-shot", results.get("zero_shot")),
        *row(f"val final (step {state.step})", results.get("final")),
        *(row(f"val best (step {state.best_step})", best) if state.best_step >= 0 else []),
        *row("test zero-shot", test.get("zero_shot")),
        *row(f"test fine-tuned (step {test.get('weights_step')})", test.get("best")),
    ]
    header = f"{'':<26}{'mIoU %':>8}{'mF1 %':>8}"
    where = f"weights: {out / 'final'}" + (f", {out / 'best'}" if state.best_step >= 0 else "")
    return "\n".join([header, *rows, where, f"metrics: {out / 'metrics.jsonl'}; tensorboard --logdir {out}"])
