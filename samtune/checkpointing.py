"""Resumable training checkpoints: written atomically, found again, loaded with a fallback, pruned.

A checkpoint is ``output_dir/checkpoints/step-N``: accelerate's ``save_state`` (model, optimizer,
scheduler, gradient scaler, RNG states, sampler) plus ``trainer_state.json`` (where the loop was).
It is written under a temporary name (``.step-N.partial``), flushed to disk and renamed when complete, so a
crash mid-write never leaves a folder that looks like a checkpoint; a failed write (a full disk) removes the
partial folder and leaves the previous checkpoint as it was.

Resuming from ``latest`` tries the complete checkpoints newest first: one that does not load (a truncated or
unreadable file, a bad ``trainer_state.json``) is reported and the previous one is tried. Loading the older
one overwrites everything ``load_state`` restores (every weight and buffer, the whole optimizer and scheduler
state, every RNG state), so a load that failed half-way leaves nothing behind.

Folders replaced as a whole (``best/``, ``final/``) are written with ``staged_folder``: a kill at any moment
leaves the old folder or the new one, or the old one aside as ``.NAME.old`` that ``recover_folder`` (run at the
start of a run, by ``recover_run_folder``) puts back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from samtune.errors import UserError

logger = logging.getLogger("samtune.checkpointing")

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
RNG_FILE = re.compile(r"^random_states_(\d+)\.pkl$")
REPLACED_FOLDERS = ("best", "final")  # what recover_run_folder puts back when a kill left only .NAME.old


class CheckpointError(UserError):
    """A checkpoint that cannot be written or loaded; the message names it and what to do."""


class NotACheckpointError(CheckpointError, FileNotFoundError):
    """``train.resume_from`` names a folder that is not a complete checkpoint."""


class _Broken(ValueError):
    """Why a checkpoint does not load, found before ``load_state`` touched anything (the message names the file)."""


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


# ---------------------------------------------------------------- folders replaced whole


def scratch_path(target: Path) -> Path:
    """Where ``target`` is written before it is published: ``.NAME.partial`` beside it."""
    return target.parent / f".{target.name}.partial"


def aside_path(target: Path) -> Path:
    """Where the previous ``target`` waits while the new one takes its name: ``.NAME.old`` beside it."""
    return target.parent / f".{target.name}.old"


def _fsync_tree(folder: Path) -> None:
    """Every file of ``folder`` on disk before it is renamed: a power cut cannot publish empty files."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def replace_folder(scratch: Path, target: Path) -> None:
    """Publish the fully written ``scratch`` as ``target``, replacing what was there.

    The old ``target`` is first renamed to ``.NAME.old``, then ``scratch`` takes the name, then the old one is
    removed: a kill between the two renames leaves no ``target`` but a complete ``.NAME.old``, which
    ``recover_folder(target)`` renames back. Every other moment leaves a complete ``target``.
    """
    old = aside_path(target)
    _fsync_tree(scratch)
    if target.exists():
        if old.exists():  # left by an earlier kill after its rename: target is complete, the old copy is stale
            shutil.rmtree(old)
        target.rename(old)
    scratch.rename(target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: Path) -> bool:
    """Undo what a kill in ``replace_folder`` or mid-write left: put ``.NAME.old`` back if ``target`` is missing,
    else remove it; remove an unfinished ``.NAME.partial``. True when the old folder was put back."""
    old, scratch = aside_path(target), scratch_path(target)
    restored = False
    if old.exists():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(target)
            restored = True
            logger.warning("put %s back: a run was stopped while replacing it", target)
    if scratch.exists():
        shutil.rmtree(scratch, ignore_errors=True)
    return restored


@contextmanager
def staged_folder(target: str | Path, then: str = "resume the run with --train.resume_from latest") -> Iterator[Path]:
    """Write a folder that replaces ``target`` as a whole: fill the yielded (empty) scratch folder; when the block
    ends it is published with ``replace_folder``. A write that fails (a full disk) removes the scratch folder,
    leaves ``target`` as it was and raises ``CheckpointError`` saying so and what to do ``then``; other errors
    (and Ctrl-C) pass through unchanged, the scratch folder removed all the same.

        with staged_folder(out / "best") as scratch:
            save_trained(model, processor, scratch)
    """
    target = Path(target)
    scratch = scratch_path(target)
    try:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        yield scratch
        replace_folder(scratch, target)
    except BaseException as error:
        recover_folder(target)  # removes the scratch folder; puts the old target back if it was moved aside
        reason = write_failure(error)
        if reason is None:
            raise
        kept = f"the previous {target} is intact" if target.exists() else f"no earlier {target} existed"
        raise CheckpointError(
            f"{reason} while writing {target}; {kept}. Free some space (or fix the folder's permissions), then {then}"
        ) from error


def recover_run_folder(output_dir: str | Path) -> None:
    """What a killed run left in its folder, tidied before a run starts or resumes (main process only): ``best/``
    and ``final/`` put back from ``.NAME.old``, unfinished ``.NAME.partial`` folders removed, checkpoints a kill
    interrupted mid-write or mid-prune removed, one moved aside mid-replace put back."""
    out = Path(output_dir)
    for name in REPLACED_FOLDERS:
        recover_folder(out / name)
    root = checkpoint_dir(out)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if (m := re.match(r"^\.(step-\d+)\.old$", path.name)) is not None:
            recover_folder(root / m.group(1))
        elif re.match(r"^\.step-\d+\.(partial|deleting)$", path.name):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- writing


def write_failure(error: BaseException) -> str | None:
    """What went wrong, if ``error`` is a failed write a user can fix (a full disk, a quota, permissions, a
    read-only or failing disk); None for anything else (a bug, or Ctrl-C).

    Besides ``OSError``, the writers report write failures their own way: safetensors as ``SafetensorError``
    ("I/O error: ... (os error 28)"), ``torch.save`` as a ``RuntimeError`` from its zip writer."""
    if isinstance(error, OSError):
        return os.strerror(error.errno).lower() if error.errno else _first_line(error)
    if not isinstance(error, Exception):
        return None
    text = str(error)
    if (m := re.search(r"os error (\d+)\)", text)) is not None:
        return os.strerror(int(m.group(1))).lower()
    if any(mark in text for mark in ("I/O error", "PytorchStreamWriter", "inline_container", "file write failed")):
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return f"a write failed ({first[:200]})"
    return None


def _remove(folder: Path) -> None:
    """Remove a folder so that a kill midway never leaves a half-removed checkpoint under its own name."""
    if not folder.exists():
        return
    doomed = folder.parent / f".{folder.name}.deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _agree(accelerator, failure: str) -> list[str]:
    """Every process's failure ("" for none), on every process: they all take the same branch after a write or
    a load (a collective; one process alone raising would leave the others waiting)."""
    if accelerator.num_processes == 1:
        return [failure]
    from accelerate.utils import gather_object

    return list(gather_object([failure]))


def save_checkpoint(accelerator, state: TrainerState, output_dir: str | Path, keep: int) -> Path:
    """Save on every process (accelerate writes per-rank RNG files), publish atomically on the main one.

    A write that fails on any process (a full disk: ``OSError`` ENOSPC and the like) removes the partial folder on
    every process's behalf and raises ``CheckpointError`` naming the folder and the previous checkpoint, which is
    left intact; any other error still removes the partial folder, then passes through unchanged.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step-{state.step}"
    scratch = scratch_path(final)
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
        except Exception as e:
            error = e
    accelerator.wait_for_everyone()
    if error is None:
        try:
            accelerator.save_state(str(scratch))
            if accelerator.is_main_process:
                (scratch / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
                _fsync_tree(scratch)  # a failing flush (a full network disk) fails here, on every process's behalf
        except Exception as e:
            error = e
        except BaseException:  # Ctrl-C mid-write: no partial folder left behind
            if accelerator.is_main_process:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
    failures = _agree(accelerator, "" if error is None else (write_failure(error) or _first_line(error)))
    if any(failures):
        if accelerator.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)
        if error is not None and write_failure(error) is None:
            raise error  # a bug, not a full disk: its own traceback
        reason = next(failure for failure in failures if failure)
        previous = [p for p in complete_checkpoints(root) if p != final] or complete_checkpoints(root)
        kept = (
            f"the previous checkpoint {previous[-1]} is intact: free some space, then resume from it with "
            "--train.resume_from latest"
            if previous
            else "there is no earlier checkpoint: free some space, then run again"
        )
        raise CheckpointError(f"{reason} while writing checkpoint {final}; {kept}") from error
    if accelerator.is_main_process:
        try:
            replace_folder(scratch, final)
        except BaseException as e:
            recover_folder(final)
            reason = write_failure(e)
            if reason is None:
                raise
            raise CheckpointError(f"{reason} while publishing checkpoint {final}") from e
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
        _remove(old)


# ---------------------------------------------------------------- loading


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path | None:
    """``latest`` -> newest complete checkpoint of this run (None if there is none); else the given folder."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = complete_checkpoints(checkpoint_dir(output_dir))
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise NotACheckpointError(
            f"train.resume_from: {path} is not a complete samtune checkpoint (no {STATE_FILE}); give a "
            f"checkpoints/step-N folder of a run, or --train.resume_from latest"
        )
    return path


def read_trainer_state(path: Path) -> TrainerState:
    """``trainer_state.json`` of a checkpoint; _Broken (a ValueError saying what is wrong) when it is not one."""
    try:
        values = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Broken(f"{STATE_FILE} does not read ({_first_line(error)})") from error
    if not isinstance(values, dict):
        raise _Broken(f"{STATE_FILE} holds no trainer state")
    try:
        return TrainerState(**values)
    except TypeError as error:
        raise _Broken(f"{STATE_FILE} holds no trainer state ({error})") from error


def _check_files(path: Path, process_index: int) -> None:
    """Cheap checks that name the bad file before ``load_state`` runs: every safetensors file is whole (header
    and data), every torch file is a whole zip archive (a truncated one has lost its directory at the end), and
    this process's RNG states load (accelerate ignores RNG files that do not load: a resume would silently draw
    other random numbers)."""
    from accelerate.utils import load
    from safetensors import safe_open

    for file in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
            elif file.suffix in (".bin", ".pkl", ".pt"):
                with file.open("rb") as f:
                    magic = f.read(4)
                if not magic:
                    raise ValueError("empty file")
                if magic == b"PK\x03\x04":  # torch.save's zip format (the legacy format is a bare pickle)
                    with zipfile.ZipFile(file):
                        pass
        except Exception as error:
            raise _Broken(f"{file.name} is truncated or unreadable ({_first_line(error)})") from error
    rng = path / f"random_states_{process_index}.pkl"
    if rng.exists():
        try:
            states = load(rng)
            missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(states)
        except Exception as error:
            raise _Broken(f"{rng.name} does not load ({_first_line(error)})") from error
        if missing:
            raise _Broken(f"{rng.name} lacks {', '.join(sorted(missing))}")
    elif not any(RNG_FILE.match(p.name) for p in path.iterdir()):
        raise _Broken("its random_states_*.pkl files are missing")
    else:
        logger.warning("%s was saved by fewer processes: process %d starts from fresh RNG states", path, process_index)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _try_load(accelerator, path: Path) -> tuple[TrainerState | None, str]:
    """Load one checkpoint on every process: (state, "") or (None, why it does not load, on some process)."""
    state, failure = None, ""
    try:
        state = read_trainer_state(path)
        _check_files(path, accelerator.process_index)
        accelerator.load_state(str(path))
    except Exception as error:
        import torch

        if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
            raise  # not the checkpoint's fault: an older one would not fit either
        failure = str(error) if isinstance(error, _Broken) else f"loading failed: {_first_line(error)}"
    failures = _agree(accelerator, failure)
    if not any(failures):
        return state, ""
    if len({why for why in failures if why}) == 1:  # one reason (every process checks every file): said once
        return None, next(why for why in failures if why)
    return None, "; ".join(f"process {rank}: {why}" for rank, why in enumerate(failures) if why)


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    """Exactly this checkpoint, or ``CheckpointError`` naming it and why it does not load (no fallback)."""
    state, failure = _try_load(accelerator, Path(path))
    if state is None:
        raise CheckpointError(
            f"train.resume_from: checkpoint {path} does not load: {failure}. Resume from another checkpoint "
            f"(the step-N folders of {Path(path).parent}) or with --train.resume_from latest"
        )
    return state


def load_for_resume(accelerator, resume_from: str, output_dir: str | Path) -> tuple[Path, TrainerState] | None:
    """Load what ``train.resume_from`` asks for; None when there is nothing to resume (a fresh start).

    ``latest``: the complete checkpoints of ``output_dir``, newest first; one that does not load is logged as a
    WARNING (its folder and why) and the previous one is tried, and the run continues exactly as if it had
    resumed from that one. When none loads, ``CheckpointError`` names each and why. A given folder: that one
    checkpoint, or ``CheckpointError`` (the user asked for that one: no fallback). Call it on every process.
    """
    if not resume_from:
        return None
    if resume_from != "latest":
        path = resolve_resume(resume_from, output_dir)
        return path, load_checkpoint(accelerator, path)
    candidates = complete_checkpoints(checkpoint_dir(output_dir))[::-1]
    if not candidates:
        return None
    tried = []
    for index, path in enumerate(candidates):
        state, failure = _try_load(accelerator, path)
        if state is not None:
            if tried and accelerator.is_main_process:
                logger.warning("resuming from %s, the newest checkpoint that loads", path)
            return path, state
        tried.append(f"{path.name} ({failure})")
        if accelerator.is_main_process:
            fallback = f"trying {candidates[index + 1].name}" if index + 1 < len(candidates) else "none left to try"
            logger.warning("checkpoint %s does not load: %s; %s", path, failure, fallback)
    root = checkpoint_dir(output_dir)
    raise CheckpointError(
        f"no checkpoint in {root} loads: {'; '.join(tried)}. Remove the broken ones and resume from a good copy, "
        "or start the run over with --overwrite"
    )
