"""The run folder: its name, whether a run may start or resume in it, and its start.

A run never mixes with another: a new run refuses a folder that holds another run's checkpoints, weights or
logs unless asked to overwrite it, and a resumed run refuses a checkpoint made with another model, method or
data. Nothing is written before the run's model and data have loaded.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from accelerate.utils import broadcast_object_list

from samtune.checkpointing import checkpoint_dir, complete_checkpoints
from samtune.config import Config, flat_values, load_config, save_config
from samtune.errors import UserError

# What a run writes (the embedding cache is not a run's: it stays valid and is shared).
RUN_ARTIFACTS = ("config.yaml", "parameters.json", "metrics.jsonl", "results.json", "tensorboard", "checkpoints",
                 "best", "final", ".best.partial")  # fmt: skip
# Settings a checkpoint is only valid for: resuming with other values would silently train something else.
RESUME_KEYS = (
    "model.name_or_path", "peft.method", "peft.targets", "peft.rank", "peft.alpha", "peft.train_modules",
    "data.train_annotations", "data.train_images", "data.prompt", "data.max_instances",
    "train.batch_size", "train.grad_accum", "train.seed",
    "train.correction_clicks", "train.mask_prompt_prob", "train.mask_only_round", "train.select_on",
    "data.augment", *(f"data.augment_{name}" for name in ("hflip", "vflip", "rot90", "degrees", "scale", "color",
    "blur", "noise", "grayscale")), "data.crop_size", "data.min_visible_area",
)  # fmt: skip


def choose_output_dir(config: Config) -> Path:
    """``output_dir``, or ``runs/<UTC date-time>`` when empty (one name for every process)."""
    if not config.output_dir:
        stamp = [datetime.datetime.now(datetime.timezone.utc).strftime("runs/%Y%m%d-%H%M%S")]
        config.output_dir = broadcast_object_list(stamp)[0]
    return Path(config.output_dir)


def run_artifacts(out: Path) -> list[str]:
    """The files and folders of a run that ``out`` already holds (an empty metrics log does not count)."""
    found = [name for name in RUN_ARTIFACTS if (out / name).exists() and name != "config.yaml"]
    if "metrics.jsonl" in found and not (out / "metrics.jsonl").stat().st_size:
        found.remove("metrics.jsonl")
    if "checkpoints" in found and not complete_checkpoints(checkpoint_dir(out)):
        found.remove("checkpoints")
    return found


def check_output_dir(out: Path, config: Config, resume_from: Path | None) -> None:
    """Refuse a folder that holds another run (unless ``overwrite``) or a checkpoint of another setup."""
    if resume_from is not None:
        check_resumable(out, config)
        return
    found = run_artifacts(out)
    if found and not config.overwrite:
        wanted = "train.resume_from latest found no checkpoint there; " if config.train.resume_from else ""
        raise UserError(
            f"output_dir {out} holds another run ({', '.join(found)}): {wanted}resume it with "
            "--train.resume_from latest, start over with --overwrite, or choose another --output_dir"
        )


def check_resumable(out: Path, config: Config) -> None:
    """The checkpoint's run used the same model, method and data (its config.yaml says), or say what differs."""
    stored_file = out / "config.yaml"
    if not stored_file.is_file():
        return
    stored = flat_values(_load_config_file(stored_file))
    current = flat_values(config)
    differ = [f"{key} {stored[key]!r} -> {current[key]!r}" for key in RESUME_KEYS if stored.get(key) != current[key]]
    if differ:
        raise UserError(
            f"cannot resume the run in {out} with other settings ({'; '.join(differ)}): use its settings "
            "(its config.yaml), or start a new run with another --output_dir"
        )


def _load_config_file(path: Path) -> Config:
    try:
        return load_config(path)
    except UserError as error:
        raise UserError(f"{path}: the stored run config does not load ({error}); use another --output_dir") from error


def start_output_dir(out: Path, config: Config, fresh: bool) -> None:
    """Create the folder and save the resolved config; a fresh run first removes an overwritten run's files."""
    if fresh and config.overwrite:
        for name in RUN_ARTIFACTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
