"""Resumable training checkpoints: written atomically, found again, pruned.

A checkpoint is ``output_dir/checkpoints/step-N``: accelerate's ``save_state`` (model, optimizer,
scheduler, gradient scaler, RNG states, sampler) plus ``trainer_state.json`` (where the loop was).
It is written under a temporary name and renamed when complete, so a crash mid-write never leaves a
folder that looks like a checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    best_miou: float = float("-inf")
    best_step: int = -1
    evals_without_improvement: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    last_train_loss: float | None = None
    epoch_seconds: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator, state: TrainerState, output_dir: str | Path, keep: int) -> Path:
    """Save on every process (accelerate writes per-rank RNG files), publish atomically on the main one."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{state.step}"
    scratch = root / f".step-{state.step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(scratch))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (scratch / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
        prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints, oldest first (partial ones never match the name)."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()
    ]
    return [p for _, p in sorted(found)]


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path | None:
    """``latest`` -> newest complete checkpoint of this run (None if there is none); else the given folder."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = complete_checkpoints(checkpoint_dir(output_dir))
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"train.resume_from: {path} is not a complete samtune checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))
