import pytest

from samtune.config import ConfigError, build_parser, load_config, parse_args


def test_defaults_file_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n  epochs: 7\ndata:\n  prompt: point\noutput_dir: runs/x\n")
    config = parse_args(["--config", str(path), "--train.epochs", "2", "--data.check_images", "false"])
    assert config.train.lr == 0.001 and config.train.epochs == 2
    assert config.data.prompt == "point" and config.data.check_images is False
    assert config.output_dir == "runs/x"
    assert config.train.batch_size == load_config().train.batch_size  # untouched keys keep defaults


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train.epochs", "three"], "train.epochs: expected an integer"),
        (["--data.check_images", "maybe"], "data.check_images: expected true or false"),
        (["--train.lr", "fast"], "train.lr: expected a number"),
    ],
)
def test_wrong_types_are_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_unknown_keys_are_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--train.epoch", "3"])
    assert "unrecognized arguments: --train.epoch" in capsys.readouterr().err
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'train.learning_rate'"):
        load_config(path)
    path.write_text("train:\n  epochs: 1.5\n")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got 1.5"):
        load_config(path)


def test_help_lists_every_key_with_default():
    text = build_parser("x").format_help()
    for key in (
        "model.name_or_path",
        "peft.method",
        "data.train_annotations",
        "data.prompt",
        "data.max_instances",
        "train.epochs",
        "train.max_steps",
        "train.batch_size",
        "train.grad_accum",
        "train.lr",
        "train.seed",
        "train.resume_from",
        "output_dir",
    ):
        assert f"--{key}" in text
    assert "(default: 16)" in text


REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "launch" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_configs_fit_the_schema(path):
    config = load_config(path)
    assert config.output_dir.startswith("runs/")


@pytest.mark.parametrize("path", sorted((REPO / "launch" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.mixed_precision in ("no", "bf16", "fp16")
