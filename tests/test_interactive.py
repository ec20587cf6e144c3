"""Interactive training: correction clicks where the model is wrong, the previous mask as a mask prompt,
the image encoder once per step, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.ndimage import distance_transform_edt

from samtune.clicks import depth, next_click, sample_clicks
from samtune.config import DataConfig, ModelConfig
from samtune.data.batch import collate, to_device
from samtune.data.coco import CocoInstanceDataset
from samtune.data.dataset import SamPromptDataset
from samtune.data.prompts import PAD_LABEL
from samtune.evaluation import sam_forward
from samtune.interactive import (
    Rounds,
    inside_image,
    instance_forward,
    instance_prompts,
    instance_rows,
    to_batch_layout,
    training_rounds,
)
from samtune.models.family import decoder_inputs, image_features
from samtune.models.loading import load_sam
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.testing.tiny import save_tiny


def _disk(side: int, centre: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:side, :side]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


@pytest.fixture(scope="module")
def errors() -> dict[str, torch.Tensor]:
    """Three instances on a 48 x 48 grid: a missed part, an extra part, both (the missed one larger), perfect."""
    truth = _disk(48, (24, 24), 14)
    missed_half = truth & (np.arange(48)[None, :] < 24)  # predicts the left half only: the right half is missed
    extra = truth | _disk(48, (8, 40), 6)  # predicts a second blob: a false positive
    both = (truth & (np.arange(48)[:, None] < 30)) | _disk(48, (40, 6), 3)  # misses the bottom, adds a dot
    preds = np.stack([missed_half, extra, both, truth])
    targets = np.stack([truth] * 4)
    return {"pred": torch.from_numpy(preds), "target": torch.from_numpy(targets)}


def test_training_clicks_land_deep_inside_the_error_with_the_right_label(errors):
    pred, target = errors["pred"], errors["target"]
    keep = torch.ones_like(pred)
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        points, labels = sample_clicks(pred, target, keep, generator)
        for n in range(3):
            x, y = points[n].tolist()
            label = int(labels[n])
            region = (target[n] & ~pred[n]) if label == 1 else (pred[n] & ~target[n])
            assert label in (0, 1) and bool(region[y, x]), (seed, n)  # positives in misses, negatives in extras
            region_depth = depth(region[None])[0]
            assert region_depth[y, x] >= (int(region_depth.max()) + 1) // 2  # in the core, away from the boundary
        assert labels[0] == 1 and labels[1] == 0  # only one kind of error there
        assert labels[3] == PAD_LABEL  # nothing wrong: no click
    again = sample_clicks(pred, target, keep, torch.Generator().manual_seed(7))
    once = sample_clicks(pred, target, keep, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(again, once))  # the seed decides


def test_training_clicks_follow_the_error_areas_and_skip_ignored_pixels(errors):
    pred, target = errors["pred"][2:3].expand(400, -1, -1), errors["target"][2:3].expand(400, -1, -1)
    _, labels = sample_clicks(pred, target, torch.ones_like(pred), torch.Generator().manual_seed(0))
    missed, extra = int((target[0] & ~pred[0]).sum()), int((pred[0] & ~target[0]).sum())
    assert float((labels == 1).float().mean()) == pytest.approx(missed / (missed + extra), abs=0.06)
    keep = torch.ones_like(pred)
    keep[:, 30:39, :] = False  # the missed bottom (rows 30-38) is a crowd region: only the extra dot is an error
    _, labels = sample_clicks(pred, target, keep, torch.Generator().manual_seed(0))
    assert bool((labels == 0).all())


def test_evaluation_click_is_the_farthest_pixel_of_the_larger_error(errors):
    pred, target = errors["pred"].numpy(), errors["target"].numpy()
    point, label = next_click(pred[0], target[0])
    missed = target[0] & ~pred[0]
    distance = distance_transform_edt(np.pad(missed, 1))[1:-1, 1:-1]
    assert label == 1 and distance[int(point[1]), int(point[0])] == distance.max()
    assert next_click(pred[1], target[1])[1] == 0
    assert next_click(pred[2], target[2])[1] == 1  # the missed bottom reaches farther than the extra dot
    ignore = np.zeros_like(target[2])
    ignore[30:39] = True
    assert next_click(pred[2], target[2], ignore)[1] == 0
    assert next_click(pred[3], target[3]) is None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("interactive")
    return {
        "train": make_synthetic_coco(root / "train", SyntheticSpec(num_images=6, seed=21, max_side=96)),
        "val": make_synthetic_coco(root / "val", SyntheticSpec(num_images=3, seed=22, max_side=96)),
    }


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("interactive-sam2"), "sam2", seed=3)


def _batch(folder, split, prompt="box"):
    model, processor = load_sam(ModelConfig(str(folder)))
    source = CocoInstanceDataset(*split)
    dataset = SamPromptDataset(source, processor, DataConfig(prompt=prompt, max_instances=3), train=False)
    return model.eval(), to_device(collate([dataset[0], dataset[1], dataset[2]]), "cpu")


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_instance_layout_gives_the_batch_forward_and_takes_a_mask_prompt(family, data, tiny_sam_dir, sam2_dir):
    model, batch = _batch(tiny_sam_dir if family == "sam" else sam2_dir, data["val"])
    assert not bool(batch["valid"].all())  # padded instances are part of the case
    with torch.no_grad():
        features = image_features(model, batch["pixel_values"])
        direct = sam_forward(model, batch, multimask_output=False)
        inputs, rows, prompts = decoder_inputs(model, features), instance_rows(batch["valid"]), instance_prompts(batch)
        rowwise = to_batch_layout(instance_forward(model, inputs, rows, prompts), batch["valid"])
        valid = batch["valid"]
        torch.testing.assert_close(rowwise.pred_masks[valid], direct.pred_masks[valid], atol=1e-4, rtol=1e-4)
        logits = direct.pred_masks[valid][:, :1]  # (N, 1, h, w): each instance's own previous mask
        masked = instance_forward(model, inputs, rows, {**prompts, "input_masks": logits})
        assert (masked.pred_masks - rowwise.pred_masks[valid][:, None]).abs().max() > 1e-3  # the mask is read
        swapped = instance_forward(model, inputs, rows, {**prompts, "input_masks": logits.roll(1, 0)})
        assert (swapped.pred_masks - masked.pred_masks).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4  # per instance


def test_inside_image_excludes_sams_padding(data, tiny_sam_dir):
    _, batch = _batch(tiny_sam_dir, data["val"])
    side = batch["low_res_masks"].shape[-1]
    inside = inside_image(batch, side)
    input_side = batch["pixel_values"].shape[-1]
    for row, (height, width) in enumerate(batch["reshaped_input_sizes"].tolist()):
        assert int(inside[row].any(1).sum()) == -(-height * side // input_side)
        assert int(inside[row].any(0).sum()) == -(-width * side // input_side)


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_rounds_add_one_click_each_and_run_the_encoder_once(family, data, tiny_sam_dir, sam2_dir):
    model, batch = _batch(tiny_sam_dir if family == "sam" else sam2_dir, data["train"], prompt="point")
    model.train()
    seen = []
    model.vision_encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    calls = []
    model.prompt_encoder.register_forward_hook(
        lambda module, args, kwargs, out: calls.append({k: v for k, v in kwargs.items() if v is not None}),
        with_kwargs=True,
    )
    features = image_features(model, batch["pixel_values"])
    rounds = Rounds(clicks=3, mask_prompt_prob=0.5, mask_only_round=True)
    history = training_rounds(model, batch, features, rounds, torch.Generator().manual_seed(0))
    assert seen == [3] and len(history) == 5  # one encoder pass for 3 images; first prompt + 3 clicks + mask-only
    points = [call["input_points"].shape[-2] for call in calls]
    first = batch["input_points"].shape[-2]
    assert points == [first, first + 1, first + 2, first + 3, first + 3]  # one click per round, none in the last
    assert "input_masks" in calls[-1] and "input_masks" not in calls[0]
    assert [out.pred_masks.shape[2] for out in history] == [3, 1, 1, 1, 1]  # multimask for the lone click only
    loss = sum(out.pred_masks.float().mean() for out in history)
    loss.backward()  # every round reaches the weights; the previous masks are detached inputs
    assert model.mask_decoder.iou_token.weight.grad is not None


def _run(train_split, val_split, folder, out, **overrides):
    from samtune.config import load_config
    from samtune.train import train

    settings = {
        "model.name_or_path": str(folder),
        "data.train_annotations": str(train_split[0]), "data.train_images": str(train_split[1]),
        "data.val_annotations": str(val_split[0]), "data.val_images": str(val_split[1]),
        "data.num_workers": 0, "data.max_instances": 2, "data.prompt": "mixed",
        "train.batch_size": 2, "train.max_steps": 6, "train.eval_every": 3, "train.log_every": 1, "train.lr": 1e-3,
        "train.log_images": 0,
        "train.correction_clicks": 2, "train.mask_only_round": True,
        "peft.method": "lora", "peft.dropout": 0.0, "output_dir": str(out), **overrides,
    }  # fmt: skip
    return train(load_config(overrides=settings))


@pytest.mark.slow
def test_resume_mid_epoch_with_rounds_is_bit_identical(tmp_path, data, tiny_sam_dir):
    # 3 batches per epoch: the stop at step 4 falls mid-epoch, between two steps' click draws
    straight = _run(data["train"], data["val"], tiny_sam_dir, tmp_path / "straight")
    _run(data["train"], data["val"], tiny_sam_dir, tmp_path / "resumed", **{"train.stop_at": 4})
    resumed = _run(data["train"], data["val"], tiny_sam_dir, tmp_path / "resumed", **{"train.resume_from": "latest"})
    a, b = load_file(tmp_path / "straight/final/adapter_model.safetensors"), load_file(
        tmp_path / "resumed/final/adapter_model.safetensors"
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"]["mIoU"] == straight["final"]["mIoU"]
    losses = [
        [line["train_loss"] for line in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
        for run in ("straight", "resumed")
    ]
    assert losses[0] == losses[1]


def test_rounds_change_what_training_learns(tmp_path, data, tiny_sam_dir):
    """The same seed with and without correction rounds trains different weights (the rounds reach the loss)."""
    common = {"train.max_steps": 2, "train.eval_every": 0, "data.prompt": "box"}
    _run(data["train"], data["val"], tiny_sam_dir, tmp_path / "clicks", **common)
    _run(data["train"], data["val"], tiny_sam_dir, tmp_path / "single", **common, **{
        "train.correction_clicks": 0, "train.mask_only_round": False})  # fmt: skip
    a = load_file(tmp_path / "clicks/final/adapter_model.safetensors")
    b = load_file(tmp_path / "single/final/adapter_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
