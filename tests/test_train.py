"""The training entry point end to end on the tiny model and generated data."""

import json
import math

import torch
import yaml
from transformers import SamModel

from samtune.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.train import main


def _run(tmp_path, tiny_sam_dir, *extra):
    train = make_synthetic_coco(tmp_path / "train", SyntheticSpec(num_images=6, seed=1))
    val = make_synthetic_coco(tmp_path / "val", SyntheticSpec(num_images=3, seed=2))
    out = tmp_path / "run"
    argv = {
        "--model.name_or_path": str(tiny_sam_dir),
        "--data.train_annotations": str(train[0]),
        "--data.train_images": str(train[1]),
        "--data.val_annotations": str(val[0]),
        "--data.val_images": str(val[1]),
        "--data.num_workers": "0",
        "--train.max_steps": "4",
        "--train.log_every": "2",
        "--train.lr": "1e-3",
        "--output_dir": str(out),
    }
    results = main([item for pair in argv.items() for item in pair] + list(extra))
    return out, results


def test_train_runs_and_writes_a_loadable_run_folder(tmp_path, tiny_sam_dir):
    out, results = _run(tmp_path, tiny_sam_dir, "--peft.method", "decoder")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["model"]["name_or_path"] == str(tiny_sam_dir)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert all(math.isfinite(line["train/loss"]) and line["train/loss"] > 0 for line in lines)
    assert 0 <= results["final"]["mIoU"] <= 1 and results["final"]["num_instances"] > 0
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    # decoder-only training: the encoder is untouched, the decoder moved
    before, after = SamModel.from_pretrained(tiny_sam_dir), SamModel.from_pretrained(out / "final")
    enc = "vision_encoder.layers.0.attn.qkv.weight"
    dec = "mask_decoder.iou_prediction_head.proj_out.weight"
    assert torch.equal(before.state_dict()[enc], after.state_dict()[enc])
    assert not torch.equal(before.state_dict()[dec], after.state_dict()[dec])


def test_demo_fills_only_what_is_missing(tmp_path, monkeypatch):
    from samtune.config import load_config
    from samtune.train import fill_demo_defaults

    monkeypatch.setenv("SAMTUNE_CACHE", str(tmp_path / "cache"))
    config = load_config(overrides={"data.val_annotations": "mine.json", "data.val_images": "imgs"})
    fill_demo_defaults(config)
    assert config.data.val_annotations == "mine.json"  # the user's validation split is kept
    assert config.data.train_annotations.endswith("train/annotations.json")
    assert (tmp_path / "cache").is_dir() and config.model.name_or_path.startswith(str(tmp_path / "cache"))
    own = load_config(overrides={"data.train_annotations": "t.json", "data.train_images": "imgs"})
    fill_demo_defaults(own)
    assert own.data.val_annotations == ""  # no demo validation data next to the user's training data


def test_adapter_run_saves_a_peft_folder(tmp_path, tiny_sam_dir):
    from peft import PeftModel

    out, results = _run(tmp_path, tiny_sam_dir, "--peft.method", "dora", "--peft.targets", "encoder-attn")
    assert (out / "final" / "adapter_config.json").exists()
    model = PeftModel.from_pretrained(SamModel.from_pretrained(tiny_sam_dir), out / "final")
    magnitudes = [n for n, _ in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all("vision_encoder" in n for n in magnitudes)
    report = json.loads((out / "parameters.json").read_text())
    assert 0 < report["vision_encoder"]["trainable"] < report["vision_encoder"]["total"]
    assert report["mask_decoder"]["trainable"] == 0


def test_method_none_evaluates_without_training(tmp_path, tiny_sam_dir):
    out, results = _run(tmp_path, tiny_sam_dir, "--peft.method", "none")
    assert results["final"]["mIoU"] == results["zero_shot"]["mIoU"]
    assert (out / "metrics.jsonl").read_text() == ""
