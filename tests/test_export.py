"""Export from a run folder: a merged model with a model card (huggingface_hub's ModelCard), loaded where PEFT is
not importable; the base found when the adapter does not record it; cards in the run's adapter folders; the push
to the Hub exercised up to the upload call."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard

from samtune.config import load_config
from samtune.errors import UserError, run_command
from samtune.export import export, resolve_base
from samtune.export import main as export_main
from samtune.export.card import build_card, hub_id
from samtune.models.loading import load_trained
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sam_dir):
    """A finished DoRA run on the tiny SAM with validation and test splits."""
    root = tmp_path_factory.mktemp("export-run")
    train_split = make_synthetic_coco(root / "train", SyntheticSpec(num_images=5, seed=1))
    val_split = make_synthetic_coco(root / "val", SyntheticSpec(num_images=3, seed=2))
    test_split = make_synthetic_coco(root / "test", SyntheticSpec(num_images=3, seed=4))
    settings = {
        "model.name_or_path": str(tiny_sam_dir),
        "peft.method": "dora",
        "peft.targets": "all-linear",
        "data.num_workers": 0,
        "train.max_steps": 3,
        "train.lr": 1e-2,
        "train.log_images": 0,
        "output_dir": str(root / "run"),
    }
    for split, (annotations, images) in {"train": train_split, "val": val_split, "test": test_split}.items():
        settings[f"data.{split}_annotations"], settings[f"data.{split}_images"] = str(annotations), str(images)
    train(load_config(overrides=settings))
    return root / "run"


def test_export_from_a_run_folder(tmp_path, tiny_sam_dir, run):
    out = export_main(["--adapter", str(run / "final"), "--out", str(tmp_path / "exported")])
    card = ModelCard.load(out / "README.md")
    results = json.loads((run / "results.json").read_text())
    # a local base is no Hub id: left out of the metadata, named in the text
    assert card.data.base_model is None and str(tiny_sam_dir) in card.text
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "mask-generation"
    assert card.data.license == "apache-2.0" and {"samtune", "sam", "dora"} <= set(card.data.tags)
    scores = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert scores == {
        ("validation", "mean_iou"): round(results["final"]["mIoU"], 4),
        ("validation", "f1"): round(results["final"]["mF1"], 4),
    }
    assert {r.dataset_name for r in card.data.eval_results} == {"val"}
    assert (
        "method `dora`" in card.text
        and "targets `all-linear`" in card.text
        and "## Training configuration" in card.text
    )
    trainable = json.loads((run / "parameters.json").read_text())["all"]["trainable"]
    assert f"{trainable:,} of" in card.text and "| validation | final |" in card.text

    # the adapter model's masks, then the exported folder's in a process where PEFT cannot be imported
    model, processor = load_trained(tiny_sam_dir, run / "final")
    image = np.random.default_rng(0).integers(0, 255, size=(70, 90, 3), dtype=np.uint8)
    inputs = processor(images=image, input_boxes=[[[5, 5, 60, 50]]], return_tensors="pt")
    with torch.no_grad():
        logits = model(
            pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"].float(), multimask_output=False
        ).pred_masks
    expected = processor.post_process_masks(logits, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    np.save(tmp_path / "inputs.npy", inputs["pixel_values"].numpy())
    code = f"""
import sys
sys.modules["peft"] = None  # any import of PEFT fails
import numpy as np, torch
from transformers import SamModel, SamProcessor
model = SamModel.from_pretrained({str(out)!r}).eval()
processor = SamProcessor.from_pretrained({str(out)!r})
pixels = torch.from_numpy(np.load({str(tmp_path / "inputs.npy")!r}))
boxes = torch.tensor({inputs["input_boxes"].float().tolist()!r})
with torch.no_grad():
    logits = model(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks
masks = processor.post_process_masks(logits, [[70, 90]], {inputs["reshaped_input_sizes"].tolist()!r})[0]
np.save({str(tmp_path / "masks.npy")!r}, masks.numpy())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    masks = np.load(tmp_path / "masks.npy")
    assert masks.shape == tuple(expected.shape) and masks.shape[-2:] == (70, 90)
    assert (masks == expected.numpy()).mean() > 0.9999


def test_run_adapter_folders_carry_the_samtune_card(run):
    results = json.loads((run / "results.json").read_text())
    for name in ("best", "final"):
        text = (run / name / "README.md").read_text()
        assert "More Information Needed" not in text  # PEFT's template is gone
        card = ModelCard.load(run / name / "README.md")
        assert card.data.library_name == "peft" and card.data.pipeline_tag == "mask-generation"
        assert "PeftModel.from_pretrained" in card.text
    best = ModelCard.load(run / "best" / "README.md").data.eval_results
    selected = json.loads((run / "best" / "metrics.json").read_text())
    scores = {(r.dataset_split, r.metric_type): r.metric_value for r in best}
    assert scores[("validation", "mean_iou")] == round(selected["mIoU"], 4)
    assert scores[("test", "mean_iou")] == round(results["test"]["best"]["mIoU"], 4)  # test of the selected weights
    assert {r.dataset_name for r in best if r.dataset_split == "test"} == {"test"}


def test_hub_base_is_named_and_local_bases_are_not(run, tmp_path):
    """The run's config names a Hub id: that is the card's base_model; a .pth or folder never is."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["name_or_path"] = "facebook/sam-vit-base"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    card = build_card(copy / "final", "SamModel", "sam", adapter=True)
    assert card.data.base_model == "facebook/sam-vit-base"
    assert hub_id("facebook/sam-vit-base") == "facebook/sam-vit-base" and hub_id(str(run)) is None
    assert hub_id("/models/sam_vit_b.pth") is None and hub_id("./sam") is None
    assert hub_id("checkpoints/medsam_vit_b.pth") is None  # a relative path to a file not here is no Hub id
    assert build_card(copy / "final", "Sam3TrackerModel", "sam3_tracker").data.license_name == "sam-license"
    assert build_card(copy / "final", "SamModel", "sam", license="mit").data.license == "mit"


def test_base_comes_from_the_run_when_the_adapter_records_none(run, tmp_path, tiny_sam_dir, capsys):
    """As an adapter trained on an original .pth: base_model_name_or_path is None."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    adapter_config = json.loads((copy / "final" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = None
    (copy / "final" / "adapter_config.json").write_text(json.dumps(adapter_config))
    assert resolve_base(copy / "final") == str(tiny_sam_dir)
    assert resolve_base(copy / "final", "other/base") == "other/base"
    # an adapter folder outside a run folder, recording no base: one line asking for --base
    alone = tmp_path / "alone"
    shutil.copytree(copy / "final", alone)
    assert run_command(export_main, ["--adapter", str(alone), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(alone) in error and "--base" in error
    # --format adapter: the adapter as it is, with the card
    out = export(alone, tmp_path / "adapter", fmt="adapter", base=str(tiny_sam_dir))
    assert (out / "adapter_model.safetensors").read_bytes() == (alone / "adapter_model.safetensors").read_bytes()
    assert ModelCard.load(out / "README.md").data.library_name == "peft"


def test_push_to_hub_up_to_the_upload(run, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload(self, **kw):
        calls.append(("upload", kw["repo_id"], sorted(p.name for p in (tmp_path / "out").iterdir())))

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    out = tmp_path / "out"
    export_main(
        ["--adapter", str(run / "best"), "--out", str(out), "--format", "adapter"]
        + ["--push-to-hub", "me/my-sam", "--private"]
    )
    assert calls[0][:2] == ("create", "me/my-sam") and calls[0][2]["private"] is True
    assert calls[1][0] == "upload" and "README.md" in calls[1][2] and "adapter_model.safetensors" in calls[1][2]


def test_push_without_network_is_one_line(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    argv = ["--adapter", str(run / "final"), "--out", str(tmp_path / "out"), "--format", "adapter"]
    assert run_command(export_main, argv + ["--push-to-hub", "me/my-sam"], prog="samtune export") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "me/my-sam" in error and "upload failed" in error
    assert (tmp_path / "out" / "README.md").is_file()  # the export itself stays


def test_bad_options_are_one_line(run, tmp_path, capsys):
    for argv, says in [
        (["--format", "hf", "--quantize", "int8"], "--quantize int8: only for --format onnx"),
        (["--private"], "--private: only with --push-to-hub"),
    ]:
        code = run_command(export_main, ["--adapter", str(run / "final"), "--out", str(tmp_path / "o"), *argv])
        assert code == 2 and says in capsys.readouterr().err
    with pytest.raises(UserError, match="neither a PEFT adapter folder"):
        export(tmp_path, tmp_path / "o2")


def test_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "samtune.export", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "neither a PEFT adapter" in result.stderr
