"""``samtune/train.py`` run as ``__main__`` (as the command runs it) with one fault planted: tests/test_faults.py.

python tests/fault_driver.py --kill-at-checkpoint N [train.py arguments ...]
    SIGKILL half-way through writing the optimizer state of the N-th checkpoint this process saves
python tests/fault_driver.py --kill-at-best [train.py arguments ...]
    the first validation after step 0 counts as better (the tiny model's mIoU need not rise in a few steps), and
    SIGKILL lands as its weights are about to replace best/ (the old best/ already moved aside or removed, the new
    one complete under .best.partial: the worst moment). No checkpoint holds the faked metric: the kill comes first
python tests/fault_driver.py --slow-zero-shot MARKER [train.py arguments ...]
    the zero-shot evaluation creates the file MARKER, then lasts 3 more seconds (time for a signal to land in it)
"""

from __future__ import annotations

import io
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_checkpoint(nth: int) -> None:
    import accelerate.checkpointing
    import torch

    real = accelerate.checkpointing.save
    seen = {"checkpoints": 0}

    def save(obj, f, *args, **kwargs):
        name = Path(f).name
        if name == "model.safetensors":
            seen["checkpoints"] += 1
        if name == "optimizer.bin" and seen["checkpoints"] == nth:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
            _die()
        return real(obj, f, *args, **kwargs)

    accelerate.checkpointing.save = save


def kill_at_best() -> None:
    from samtune.training.run import TrainingRun

    keep_best = TrainingRun.keep_best

    def better_after_step_0(self, metrics):
        return keep_best(self, {**metrics, "mIoU": metrics["mIoU"] + self.state.step})

    TrainingRun.keep_best = better_after_step_0
    real = Path.rename

    def rename(self, target):
        if self.name == ".best.partial" and json.loads((self / "metrics.json").read_text())["step"] > 0:
            _die()
        return real(self, target)

    Path.rename = rename


def slow_zero_shot(marker: Path) -> None:
    import samtune.training.run

    real = samtune.training.run.score_loader
    calls = {"n": 0}

    def score_loader(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            marker.write_text("zero-shot evaluation running\n")
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                time.sleep(0.05)
        return real(*args, **kwargs)

    samtune.training.run.score_loader = score_loader


def main() -> None:
    args = sys.argv[1:]
    fault = args.pop(0)
    sys.path.insert(0, str(REPO))
    if fault == "--kill-at-checkpoint":
        kill_at_checkpoint(int(args.pop(0)))
    elif fault == "--kill-at-best":
        kill_at_best()
    elif fault == "--slow-zero-shot":
        slow_zero_shot(Path(args.pop(0)))
    else:
        raise SystemExit(f"fault_driver.py: unknown fault {fault}")
    script = REPO / "samtune" / "train.py"
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
