"""Faults a run meets and what the user then sees: kills mid-write, corrupted checkpoints, a full disk, Ctrl-C.

Each test checks what the user sees (exit status, one line on stderr, no traceback, the file named) and what is left
on disk. NaN validation metrics never counting as better is tests/test_train.py's
test_a_validation_split_without_instances_never_counts_as_better.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from samtune.checkpointing import (
    CheckpointError,
    aside_path,
    complete_checkpoints,
    recover_folder,
    replace_folder,
    scratch_path,
    staged_folder,
)
from samtune.errors import run_command
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "fault_driver.py"
PROG = "samtune train"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is several times faster than threads contending (and the
    subprocesses run with OMP_NUM_THREADS=1, so every run sums in the same order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """4 images, each with instances: the training and the validation split alike."""
    return make_synthetic_coco(tmp_path_factory.mktemp("faults"), SyntheticSpec(num_images=4, seed=5, empty_every=100))


def _argv(images, tiny_sam_dir, out, **overrides) -> list[str]:
    """6 steps of batch 1 (4 per epoch), a checkpoint every step, validation every 2 steps, dropout on (the RNG
    states matter): a resume that is not exact shows in the final weights."""
    settings = {
        "model.name_or_path": tiny_sam_dir,
        "data.train_annotations": images[0],
        "data.train_images": images[1],
        "data.val_annotations": images[0],
        "data.val_images": images[1],
        "data.num_workers": 0,
        "data.max_instances": 2,
        "peft.method": "lora",
        "peft.targets": "all-linear",
        "peft.dropout": 0.1,
        "train.max_steps": 6,
        "train.batch_size": 1,
        "train.lr": 1e-2,
        "train.log_every": 2,
        "train.eval_every": 2,
        "train.save_every": 1,
        "train.keep_checkpoints": 0,
        "train.log_images": 0,
        "output_dir": out,
        **overrides,
    }
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def _weights(folder: Path) -> dict:
    return load_file(folder / "adapter_model.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    """Bit-identical, but for attention key biases (tests/test_train.py's _assert_same_weights says why)."""
    assert a.keys() == b.keys()
    for key in a:
        if not key.endswith("k_proj.bias"):
            assert torch.equal(a[key], b[key]), key


def _best_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _command(argv: list[str], capsys) -> tuple[int, str]:
    """``samtune train ARGV`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    status = run_command(train_main, argv, PROG)
    return status, capsys.readouterr().err


def _run_process(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def _train_py(argv: list[str]) -> subprocess.CompletedProcess:
    """The ordinary command: python samtune/train.py ARGV."""
    return _run_process([sys.executable, str(REPO / "samtune" / "train.py"), *argv])


def _assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]


def _error_line(err: str, prog: str = PROG) -> str:
    """The one line the command said last (stderr also holds the run's log and progress bars); no traceback, no
    other line of the command's own."""
    _assert_no_traceback(err)
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err)  # progress bars' cursor moves
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    assert lines and sum(line.startswith(f"{prog}:") for line in lines) == 1, err[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def straight(images, tiny_sam_dir, tmp_path_factory):
    """The uninterrupted run every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_command(train_main, _argv(images, tiny_sam_dir, out), PROG) == 0
    return out


@pytest.fixture(scope="module")
def stopped(images, tiny_sam_dir, tmp_path_factory):
    """The same run stopped at step 4: checkpoints step-1 ... step-4 (tests break copies of it)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert run_command(train_main, _argv(images, tiny_sam_dir, out, **{"train.stop_at": 4}), PROG) == 0
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-1", "step-2", "step-3", "step-4"]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ---------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_then_resume_matches_an_uninterrupted_run(
    tmp_path, images, tiny_sam_dir, straight
):
    out = tmp_path / "run"
    argv = _argv(images, tiny_sam_dir, out)
    killed = _run_process([sys.executable, str(DRIVER), "--kill-at-checkpoint", "4", *argv])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step-1", "step-2", "step-3"]
    assert (checkpoints / ".step-4.partial" / "model.safetensors").exists()  # what the kill left: never a step-4

    resumed = _train_py(argv + ["--train.resume_from", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_no_traceback(resumed.stderr)
    assert f"resumed from {checkpoints / 'step-3'} at step 3" in resumed.stderr
    assert not (checkpoints / ".step-4.partial").exists()
    _assert_same_weights(_weights(straight / "final"), _weights(out / "final"))
    _assert_same_weights(_weights(straight / "best"), _weights(out / "best"))


@pytest.mark.slow
def test_kill_while_best_is_replaced_keeps_the_previous_best_then_resume_matches(
    tmp_path, images, tiny_sam_dir, straight, capsys
):
    assert _best_metrics(straight / "best")["step"] == 0  # no later step did better
    out = tmp_path / "run"
    argv = _argv(images, tiny_sam_dir, out)
    # the driver makes the validation at step 2 count as better, and kills the process as it replaces best/
    killed = _run_process([sys.executable, str(DRIVER), "--kill-at-best", *argv])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    best = out / "best"
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-1"]
    assert (scratch_path(best) / "metrics.json").exists()  # killed with the new best/ complete, not yet in place
    kept = best if best.is_dir() else aside_path(best)  # the old one: in place, or aside for the next run
    assert kept.is_dir(), f"the kill left neither {best} nor {aside_path(best)}: the previous best/ is lost"
    assert _best_metrics(kept)["step"] == 0

    # the ordinary command in-process (tests/test_faults.py runs the train.py command itself above)
    status, err = _command(argv + ["--train.resume_from", "latest"], capsys)
    assert status == 0, err[-3000:]
    _assert_no_traceback(err)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # nothing aside or partial left
    assert _best_metrics(best) == _best_metrics(straight / "best")
    _assert_same_weights(_weights(straight / "best"), _weights(best))
    _assert_same_weights(_weights(straight / "final"), _weights(out / "final"))


def test_a_kill_at_any_moment_of_replace_folder_leaves_a_findable_folder(tmp_path):
    target = tmp_path / "best"

    def fresh(old: str, new: str) -> Path:
        shutil.rmtree(tmp_path)
        target.mkdir(parents=True)
        (target / "weights").write_text(old)
        scratch = scratch_path(target)
        scratch.mkdir()
        (scratch / "weights").write_text(new)
        return scratch

    # the three states a kill can leave, each put right by the next run's recover_folder
    scratch = fresh("old", "new")  # killed while the new one was written
    recover_folder(target)
    assert (target / "weights").read_text() == "old" and not scratch.exists()
    scratch = fresh("old", "new")  # killed between the renames
    target.rename(aside_path(target))
    assert recover_folder(target) and (target / "weights").read_text() == "old"
    assert not aside_path(target).exists() and not scratch.exists()
    scratch = fresh("old", "new")  # killed while the old one was being removed
    target.rename(aside_path(target))
    scratch.rename(target)
    assert not recover_folder(target) and (target / "weights").read_text() == "new"
    assert not aside_path(target).exists()
    scratch = fresh("old", "new")
    replace_folder(scratch, target)
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# ---------------------------------------------------------------- corrupted checkpoints


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, images, tiny_sam_dir, stopped, straight, caplog, capsys
):
    out = _copy(stopped, tmp_path)
    checkpoints = out / "checkpoints"
    # step-4: a whole file of the wrong content, so the model loads from step-4 before the optimizer fails; the
    # fallback must overwrite all of it
    torch.save({"state": {}, "param_groups": []}, checkpoints / "step-4" / "optimizer.bin")
    _truncate(checkpoints / "step-3" / "model.safetensors")  # step-3: truncated
    argv = _argv(images, tiny_sam_dir, out, **{"train.resume_from": "latest"})
    with caplog.at_level(logging.WARNING, logger="samtune.checkpointing"):
        status, err = _command(argv, capsys)
    assert status == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"checkpoint {checkpoints / 'step-4'} does not load" in w and "different number" in w for w in warnings)
    assert any(
        f"checkpoint {checkpoints / 'step-3'} does not load: model.safetensors is truncated" in w for w in warnings
    ), warnings
    assert any(f"resuming from {checkpoints / 'step-2'}" in w for w in warnings), warnings
    _assert_same_weights(_weights(straight / "final"), _weights(out / "final"))


def test_when_no_checkpoint_loads_the_run_exits_2_naming_each(tmp_path, images, tiny_sam_dir, stopped, capsys):
    out = _copy(stopped, tmp_path)
    checkpoints = out / "checkpoints"
    (checkpoints / "step-4" / "trainer_state.json").write_text('{"step": 4, "epo')
    _truncate(checkpoints / "step-3" / "random_states_0.pkl")
    _truncate(checkpoints / "step-2" / "scheduler.bin")
    (checkpoints / "step-1" / "optimizer.bin").write_bytes(b"")
    before = {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()}

    status, err = _command(_argv(images, tiny_sam_dir, out, **{"train.resume_from": "latest"}), capsys)
    assert status == 2
    line = _error_line(err)
    assert line.startswith(f"{PROG}: error: no checkpoint in {checkpoints} loads: "), line
    for name, why in [
        ("step-4", "trainer_state.json does not read"),
        ("step-3", "random_states_0.pkl is truncated"),
        ("step-2", "scheduler.bin is truncated"),
        ("step-1", "optimizer.bin is truncated or unreadable (empty file)"),
    ]:
        assert f"{name} ({why}" in line, (name, line)
    assert "--overwrite" in line
    assert not (out / "final").exists()
    assert {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()} == before  # left as they were


def test_a_named_checkpoint_that_does_not_load_is_an_error_not_a_fallback(
    tmp_path, images, tiny_sam_dir, stopped, capsys
):
    out = _copy(stopped, tmp_path)
    named = out / "checkpoints" / "step-3"
    _truncate(named / "optimizer.bin")
    status, err = _command(_argv(images, tiny_sam_dir, out, **{"train.resume_from": named}), capsys)
    assert status == 2
    assert _error_line(err) == (
        f"{PROG}: error: train.resume_from: checkpoint {named} does not load: optimizer.bin is truncated or "
        f"unreadable (File is not a zip file). Resume from another checkpoint (the step-N folders of "
        f"{named.parent}) or with --train.resume_from latest"
    )
    status, err = _command(_argv(images, tiny_sam_dir, out, **{"train.resume_from": out / "nowhere"}), capsys)
    assert status == 2
    assert _error_line(err).startswith(f"{PROG}: error: train.resume_from: {out / 'nowhere'} is not a complete ")


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(
    tmp_path, images, tiny_sam_dir, straight, monkeypatch, capsys
):
    import accelerate.checkpointing

    real = accelerate.checkpointing.save
    seen = {"checkpoints": 0}

    def full_disk(obj, f, *args, **kwargs):
        seen["checkpoints"] += Path(f).name == "model.safetensors"
        if seen["checkpoints"] == 3 and Path(f).name == "optimizer.bin":
            Path(f).write_bytes(b"PK\x03\x04 half of it")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", full_disk)
    out = tmp_path / "run"
    status, err = _command(_argv(images, tiny_sam_dir, out), capsys)
    checkpoints = out / "checkpoints"
    assert status == 2
    assert _error_line(err) == (
        f"{PROG}: error: no space left on device while writing checkpoint {checkpoints / 'step-3'}; the previous "
        f"checkpoint {checkpoints / 'step-2'} is intact: free some space, then resume from it with "
        "--train.resume_from latest"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1", "step-2"]  # no partial folder left

    monkeypatch.setattr(accelerate.checkpointing, "save", real)  # space freed: the run resumes and ends as if whole
    status, err = _command(_argv(images, tiny_sam_dir, out, **{"train.resume_from": "latest"}), capsys)
    assert status == 0, err
    _assert_same_weights(_weights(straight / "final"), _weights(out / "final"))


def test_a_full_disk_while_replacing_a_folder_keeps_the_old_one(tmp_path):
    best = tmp_path / "best"
    best.mkdir()
    (best / "weights").write_text("old")
    with pytest.raises(CheckpointError) as caught, staged_folder(best) as scratch:
        (scratch / "weights").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(scratch / "weights"))
    assert str(caught.value) == (
        f"no space left on device while writing {best}; the previous {best} is intact. Free some space (or fix "
        "the folder's permissions), then resume the run with --train.resume_from latest"
    )
    assert (best / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    with pytest.raises(ZeroDivisionError), staged_folder(best):  # a bug stays a bug, and still cleans up
        1 / 0  # noqa: B018
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_a_write_the_disk_refuses_is_reported_whichever_writer_failed(tmp_path, writer):
    # A real refusal by the OS (a file-size limit: EFBIG, as a full disk gives ENOSPC), through the real writers,
    # which do not raise OSError: safetensors raises SafetensorError, torch.save a RuntimeError from its zip writer.
    import resource

    from safetensors.torch import save_file

    write = {"safetensors": lambda path: save_file({"w": torch.zeros(256, 256)}, path), "torch": torch.save}[writer]
    target = tmp_path / "best"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
        with pytest.raises(CheckpointError) as caught, staged_folder(target) as scratch:
            if writer == "torch":
                write({"w": torch.zeros(256, 256)}, scratch / "weights.bin")
            else:
                write(scratch / "weights.safetensors")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    message = str(caught.value)
    assert message.startswith("file too large while writing " if writer == "safetensors" else "a write failed (")
    assert f"{target}; no earlier {target} existed" in message
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_evaluate_exits_130_and_writes_nothing(tmp_path, images, tiny_sam_dir, monkeypatch, capsys):
    import samtune.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(samtune.evaluate, "sam_forward", interrupted)
    output = tmp_path / "results.json"
    argv = ["--model", str(tiny_sam_dir), "--annotations", str(images[0]), "--images", str(images[1])]
    argv += ["--device", "cpu", "--output", str(output), "--coco"]
    capsys.readouterr()
    status = run_command(samtune.evaluate.main, argv, "samtune evaluate")
    captured = capsys.readouterr()
    assert status == 130
    assert _error_line(captured.err, "samtune evaluate") == "samtune evaluate: interrupted"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_during_the_zero_shot_evaluation_stops_after_it_with_a_checkpoint(tmp_path, images, tiny_sam_dir):
    out = tmp_path / "run"
    marker = tmp_path / "evaluating"
    command = [sys.executable, str(DRIVER), "--slow-zero-shot", str(marker), *_argv(images, tiny_sam_dir, out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # a new process group, signalled as a whole: what Ctrl-C in a terminal does
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the run never reached its zero-shot evaluation"
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130, err[-3000:]
    _assert_no_traceback(err)
    assert "resume with --train.resume_from latest" in err, err[-3000:]
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-0"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["zero-shot"]  # the evaluation it was in finished
    assert not (out / "final").exists()
