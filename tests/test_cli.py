"""The ``samtune`` command as users meet it: sub-commands, one-line errors with status 2, refusals of half-given
setups and of folders that hold another run, quiet help."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from PIL import Image

from samtune import cli
from samtune.errors import run_command
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("data"), SyntheticSpec(num_images=4, seed=6, empty_every=100))


def _samtune(argv, capsys) -> tuple[int, str]:
    """Run the console command in-process: (exit status, stderr)."""
    status = cli.main(argv)
    return status, capsys.readouterr().err


def _train_args(model, split, out, *extra) -> list[str]:
    annotations, images = split
    return ["train", "--model.name_or_path", str(model), "--data.train_annotations", str(annotations),
            "--data.train_images", str(images), "--data.num_workers", "0", "--train.max_steps", "1",
            "--train.log_images", "0", "--output_dir", str(out), *extra]  # fmt: skip


def _assert_one_line_error(status, err, *names):
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("samtune")]
    assert len(lines) == 1 and lines[0].startswith("samtune train: error: "), err
    for name in names:
        assert name in lines[0], (name, err)


def test_one_console_command_with_sub_commands():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "samtune"]
    assert script.value == "samtune.cli:main"
    result = subprocess.run([str(BIN / "samtune"), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    for command in ("train", "evaluate", "predict", "export", "convert", "demo"):
        assert command in result.stdout


def test_train_help_is_quiet_and_lists_choices():
    env = {k: v for k, v in os.environ.items() if k != "SAMTUNE_DEBUG"}
    result = subprocess.run([str(BIN / "samtune"), "train", "--help"], capture_output=True, text=True, env=env,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no bitsandbytes, torchvision or deprecation message
    assert result.stdout.startswith("usage: samtune train")
    assert "--peft.method {lora,dora,qlora,qdora,full,decoder,hq,none}" in result.stdout


def test_a_model_without_data_is_refused_naming_the_missing_keys(capsys):
    status, err = _samtune(["train", "--model.name_or_path", "my-model"], capsys)
    _assert_one_line_error(status, err, "data.train_annotations", "data.train_images")
    status, err = _samtune(["train", "--data.train_annotations", "a.json", "--data.train_images", "img"], capsys)
    _assert_one_line_error(status, err, "model.name_or_path")


def test_val_images_without_val_annotations_are_refused(capsys, tiny_sam_dir, split, tmp_path):
    status, err = _samtune(_train_args(tiny_sam_dir, split, tmp_path / "run", "--data.val_images", "img"), capsys)
    _assert_one_line_error(status, err, "data.val_annotations")
    assert not (tmp_path / "run").exists()


def _break_file_name(data, image_dir):
    data["images"][0]["file_name"] = "../outside.png"


def _break_category(data, image_dir):
    data["annotations"][0]["category_id"] = 999


def _break_image_id(data, image_dir):
    data["annotations"][0]["image_id"] = 12345


def _break_size(data, image_dir):
    data["images"][0]["width"] += 7


def _remove_image(data, image_dir):
    (image_dir / data["images"][0]["file_name"]).unlink()


def _truncate_json(data, image_dir):
    return json.dumps(data)[:200]


@pytest.mark.parametrize(
    ("breakage", "names"),
    [
        (_break_file_name, ["../outside.png", "image id"]),
        (_break_category, ["category id 999"]),
        (_break_image_id, ["image id 12345"]),
        (_break_size, ["image id", "width x height"]),
        (_remove_image, ["image file is missing"]),
        (_truncate_json, ["malformed JSON"]),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else "",
)
def test_bad_data_ends_with_one_line_and_status_2_and_writes_nothing(breakage, names, capsys, tiny_sam_dir, split,
                                                                     tmp_path):  # fmt: skip
    annotations, images = split
    image_dir = tmp_path / "images"
    shutil.copytree(images, image_dir)
    data = json.loads(Path(annotations).read_text())
    text = breakage(data, image_dir)
    broken = tmp_path / "broken.json"
    broken.write_text(text if text is not None else json.dumps(data))
    out = tmp_path / "run"
    status, err = _samtune(_train_args(tiny_sam_dir, (broken, image_dir), out), capsys)
    _assert_one_line_error(status, err, "broken.json", *names)
    assert not out.exists()  # nothing half-written


def test_a_truncated_image_is_named_when_it_is_read(capsys, tiny_sam_dir, split, tmp_path):
    annotations, images = split
    image_dir = tmp_path / "images"
    shutil.copytree(images, image_dir)
    data = json.loads(Path(annotations).read_text())
    first = image_dir / data["images"][0]["file_name"]
    Image.open(first).convert("RGB").save(first.with_suffix(".png"))
    first.with_suffix(".png").replace(first)
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # the header survives: found on decoding
    status, err = _samtune(_train_args(tiny_sam_dir, (annotations, image_dir), tmp_path / "run",
                                       "--data.num_workers", "1"), capsys)  # fmt: skip
    _assert_one_line_error(status, err, str(first), f"image id {data['images'][0]['id']}")


def test_a_folder_holding_another_run_is_refused_unless_resumed_or_overwritten(capsys, tiny_sam_dir, split,
                                                                              tmp_path):  # fmt: skip
    out = tmp_path / "run"
    assert _samtune(_train_args(tiny_sam_dir, split, out), capsys)[0] == 0
    finished = (out / "results.json").stat().st_mtime_ns
    status, err = _samtune(_train_args(tiny_sam_dir, split, out), capsys)
    _assert_one_line_error(status, err, str(out), "results.json", "--overwrite", "--train.resume_from")
    assert (out / "results.json").stat().st_mtime_ns == finished  # untouched
    assert _samtune(_train_args(tiny_sam_dir, split, out, "--overwrite"), capsys)[0] == 0
    assert (out / "results.json").stat().st_mtime_ns != finished


def test_resuming_with_another_model_or_method_says_what_differs(capsys, tiny_sam_dir, split, tmp_path):
    out = tmp_path / "run"
    args = _train_args(tiny_sam_dir, split, out, "--train.max_steps", "2", "--train.stop_at", "1")
    assert _samtune(args, capsys)[0] == 0 and (out / "checkpoints" / "step-1").is_dir()
    status, err = _samtune(args + ["--train.resume_from", "latest", "--peft.method", "lora"], capsys)
    _assert_one_line_error(status, err, "peft.method 'dora' -> 'lora'", str(out))
    assert _samtune(args[:-2] + ["--train.resume_from", "latest"], capsys)[0] == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 2


def test_a_run_without_output_dir_gets_its_own_dated_folder(capsys, tiny_sam_dir, split, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a for a in _train_args(tiny_sam_dir, split, "x") if a not in ("--output_dir", "x")]
    assert _samtune(args, capsys)[0] == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name[:8].isdigit() and folder.name[8] == "-" and (folder / "results.json").exists()
    assert yaml.safe_load((folder / "config.yaml").read_text())["output_dir"] == f"runs/{folder.name}"


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception, match="data.train_annotations"):
        cli.main(["--debug", "train", "--model.name_or_path", "my-model"])


def test_only_the_first_process_reports(capsys, monkeypatch):
    def bad(argv):
        from samtune.errors import UserError

        raise UserError("x.json: broken")

    monkeypatch.delenv("SAMTUNE_DEBUG", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert run_command(bad, [], "samtune train") == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert run_command(bad, [], "samtune train") == 2
    assert capsys.readouterr().err == "samtune train: error: x.json: broken\n"


def test_the_tools_follow_the_same_rules(capsys, tiny_sam_dir, split, tmp_path):
    annotations, images = split
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    status, err = _samtune(["evaluate", "--model", str(tiny_sam_dir), "--annotations", str(broken), "--images",
                            str(images)], capsys)  # fmt: skip
    assert status == 2 and err.startswith("samtune evaluate: error: ") and "broken.json" in err
    status, err = _samtune(["predict", "--model", str(tiny_sam_dir), "--images", str(images), "--prompts",
                            str(broken)], capsys)  # fmt: skip
    assert status == 2 and err == f"samtune predict: error: {broken}: malformed JSON at line 1, column 13: " + (
        "Expecting value\n"
    )  # the inputs are read before the model loads: nothing else on stderr
    status, err = _samtune(["export", "--adapter", str(tmp_path), "--out", str(tmp_path / "x")], capsys)
    assert status == 2 and "neither a PEFT adapter folder" in err and not (tmp_path / "x").exists()
    status, err = _samtune(["convert", str(broken), str(tmp_path / "y")], capsys)
    assert status == 2 and err.startswith("samtune convert: error: ") and "Traceback" not in err
    status, err = _samtune(["evaluate", "--model", str(tmp_path / "no-such-model"), "--annotations",
                            str(annotations), "--images", str(images)], capsys)  # fmt: skip
    assert status == 2 and "no-such-model: no such file or folder" in err
