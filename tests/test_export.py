"""Export from a run folder: a merged SamModel with a model card, loaded where PEFT is not importable."""

import subprocess
import sys

import numpy as np
import torch

from samtune.export import main as export
from samtune.models.loading import load_trained
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco


def test_export_from_a_run_folder(tmp_path, tiny_sam_dir, train_tiny):
    train_split = make_synthetic_coco(tmp_path / "train", SyntheticSpec(num_images=5, seed=1))
    val_split = make_synthetic_coco(tmp_path / "val", SyntheticSpec(num_images=3, seed=2))
    run = tmp_path / "run"
    train_tiny(run, train_split, val_split, **{"peft.method": "dora", "peft.targets": "all-linear"})
    out = export(["--adapter", str(run / "final"), "--out", str(tmp_path / "exported")])
    card = (out / "README.md").read_text()
    assert "base_model: " + str(tiny_sam_dir) in card and "method `dora`" in card
    assert "targets `all-linear`" in card and "| final |" in card and "## Training configuration" in card
    assert str(train_split[0]) in card

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
