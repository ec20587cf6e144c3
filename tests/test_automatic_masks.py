"""Automatic masks: SAM's definitions (stability, crop layers, point grid), RLE placement and mask NMS, the same
masks as the previous implementation where both should agree, regions / tiles, evaluate --automatic."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from samtune.automatic_masks import (
    EDGE_TOLERANCE,
    AutomaticConfig,
    automatic_masks,
    crop_layers,
    dedup,
    point_grid,
    rle_in_image,
    stability_score,
)
from samtune.errors import UserError
from samtune.evaluation import coco_metrics, encode_rle
from samtune.models.family import post_process_masks
from samtune.models.loading import load_trained
from samtune.testing.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
NO_FILTER = {"min_score": -100.0, "min_stability": -1.0}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# segment_anything's own helpers, by file: its package __init__ imports torchvision (not installable here)
amg = _load(
    "sam_amg", Path(importlib.util.find_spec("segment_anything").submodule_search_locations[0]) / "utils/amg.py"
)


@functools.cache
def _benchmark():
    """benchmarks/automatic_masks.py (the previous implementation, the photo, the agreement measure)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as when it runs as a file: it imports benchmarks/common.py
    try:
        return _load("benchmark_automatic_masks", ROOT / "benchmarks/automatic_masks.py")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def tiny(tiny_sam_dir):
    model, processor = load_trained(str(tiny_sam_dir), None)
    return model.eval(), processor


@pytest.fixture(scope="module")
def demo():
    """The shipped demo base: trained, so its masks follow objects."""
    model, processor = load_trained(str(ROOT / "samtune/demo/base"), None)
    return model.eval(), processor


def _rles(masks) -> list[dict]:
    return [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]


def test_stability_score_is_sams():
    logits = torch.randn(6, 40, 50) * 3
    logits[0] = -5  # empty: SAM divides 0 by 0, samtune says 0 (the mask is dropped either way)
    ours = stability_score(logits, offset=1.0)
    theirs = amg.calculate_stability_score(logits, 0.0, 1.0)
    torch.testing.assert_close(ours[1:], theirs[1:].float())
    assert ours[0] == 0


@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("size", [(300, 400), (517, 211)])
def test_crop_layers_and_grid_are_sams(layers, size):
    height, width = size
    image = np.zeros((height, width, 3), np.uint8)
    ours = crop_layers(image, AutomaticConfig(crop_layers=layers, crop_overlap=0.3))
    boxes, layer_ids = amg.generate_crop_boxes((height, width), layers, 0.3)
    assert [box for box, _ in ours] == boxes
    assert [layer for _, layer in ours] == layer_ids
    np.testing.assert_allclose(point_grid(5, width, height), amg.build_point_grid(5) * [width, height])


def test_rle_in_image_equals_the_pasted_mask():
    rng = np.random.default_rng(0)
    height, width = 37, 53
    for x0, y0, h, w in [(0, 0, 37, 53), (5, 7, 20, 30), (0, 10, 27, 53), (23, 0, 37, 30), (52, 36, 1, 1)]:
        mask = rng.random((h, w)) > 0.5
        mask[0, 0] = mask[-1, -1] = True  # runs starting and ending inside the mask
        full = np.zeros((height, width), bool)
        full[y0 : y0 + h, x0 : x0 + w] = mask
        ours = rle_in_image(mask, x0, y0, height, width)
        assert ours == mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))


def test_dedup_keeps_the_better_of_overlapping_masks():
    a = np.zeros((20, 20), bool)
    a[2:12, 2:12] = True  # 100 px
    near = np.zeros_like(a)
    near[2:12, 3:13] = True  # IoU with a: 90 / 110 = 0.82
    apart = np.zeros_like(a)
    apart[15:19, 15:19] = True
    rles = _rles([near, a, apart])
    assert dedup(rles, [1, 0, 2], 0.7) == [1, 2]  # a ranked first: near goes
    assert dedup(rles, [0, 1, 2], 0.7) == [0, 2]
    assert dedup(rles, [1, 0, 2], 0.85) == [1, 0, 2]
    assert dedup([], [], 0.7) == []


def test_same_masks_as_the_previous_implementation_without_filters(tiny):
    """Filters off, an image no larger than the model's input: both keep the same masks (the previous one
    de-duplicated full-size tensors pairwise, this one RLEs with pycocotools)."""
    model, processor = tiny
    image = _benchmark().photo(96, 120)
    previous = _benchmark().previous_automatic_masks(model, processor, image, "cpu", 4, -100.0, -1.0)
    config = AutomaticConfig(points_per_side=4, **NO_FILTER)
    new = automatic_masks(model, processor, image, "cpu", config, progress=False)
    assert len(new) == len(previous) > 1
    for mask, (old, score) in zip(new, previous):
        # the clicks reach the model scaled in float32 here, float64 there: the last bits differ
        assert mask.score == pytest.approx(score, abs=1e-4)
        assert (mask.mask() == old.numpy()).mean() > 0.999
        assert mask.logits is not None and mask.crop_box == [0, 0, 120, 96]


def test_masks_agree_with_the_previous_implementation_on_a_larger_photo(demo):
    """A photo larger than the model's input, the same score threshold: the new masks are the previous ones
    within IoU 0.9 (the previous one kept pairs at 0.7 IoU measured at full size, this one at the input size)."""
    model, processor = demo
    bench = _benchmark()
    image = bench.photo(480, 640)
    previous = bench.previous_automatic_masks(model, processor, image, "cpu", 8, 0.7, -1.0)
    config = AutomaticConfig(points_per_side=8, min_score=0.7, min_stability=-1.0)
    new = automatic_masks(model, processor, image, "cpu", config, progress=False)
    matched = bench.agreement(
        [mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8))) for m, _ in previous],
        [{**m.segmentation, "counts": m.segmentation["counts"].encode()} for m in new],
    )
    assert len(new) >= 3
    assert matched["matched_new"] >= 0.9 and matched["matched_previous"] >= 0.9, matched


def test_sam_defaults_filter_by_upscaled_stability(demo):
    """SAM's thresholds are the defaults, and stability is scored on the upscaled logits: every kept mask's
    stability passes the threshold and equals the score recomputed from its logits at the original size."""
    model, processor = demo
    default = AutomaticConfig()
    assert (default.points_per_side, default.min_score, default.min_stability) == (32, 0.88, 0.95)
    image = _benchmark().photo(200, 240)
    config = AutomaticConfig(points_per_side=6, min_score=0.5, min_stability=0.8)
    found = automatic_masks(model, processor, image, "cpu", config, progress=False)
    assert found
    reshaped = processor(images=image, return_tensors="pt")["reshaped_input_sizes"]
    for mask in found:
        upscaled = post_process_masks(
            processor, mask.logits[None, None, None], torch.tensor([[200, 240]]), reshaped, binarize=False
        )[0][0, 0]
        assert mask.stability > 0.8 and mask.score > 0.5
        assert mask.stability == pytest.approx(float(stability_score(upscaled)), abs=1e-6)
        np.testing.assert_array_equal(mask.mask(), (upscaled > 0).numpy())
    low_res = stability_score(torch.stack([m.logits for m in found]))  # what the previous one scored
    assert not torch.allclose(low_res, torch.tensor([m.stability for m in found]), atol=1e-3)


def test_regions_tiles_and_crop_layers(tiny, demo):
    """Caller's regions: masks at the whole image's size inside their region, none cut by an inner region edge,
    no logits (not in the whole image's frame); duplicates across regions removed. Crop layers do the same with
    SAM's crops."""
    model, processor = tiny
    image = _benchmark().photo(150, 200)
    height, width = image.shape[:2]
    tiles = [[0, 0, 120, 150], [80, 0, 200, 150]]
    config = AutomaticConfig(points_per_side=4, **NO_FILTER)
    found = automatic_masks(model, processor, image, "cpu", config, crop_boxes=tiles, progress=False)
    assert found
    for mask in found:
        assert mask.segmentation["size"] == [height, width] and mask.logits is None
        x0, y0, x1, y1 = mask.crop_box
        assert mask.crop_box in tiles
        x, y, w, h = mask.bbox
        assert x0 <= x and x + w <= x1 and y0 <= y and y + h <= y1
        inner = [edge for edge, border in ((x0, 0), (x1, width)) if edge != border]
        assert all(abs(x - edge) > EDGE_TOLERANCE and abs(x + w - edge) > EDGE_TOLERANCE for edge in inner)
    rles = [{**m.segmentation, "counts": m.segmentation["counts"].encode()} for m in found]
    ious = np.asarray(mask_utils.iou(rles, rles, [0] * len(rles)))
    assert (ious[~np.eye(len(rles), dtype=bool)] <= config.crop_dedup_iou).all()

    whole = automatic_masks(model, processor, image, "cpu", config, crop_boxes=[[0, 0, width, height]], progress=False)
    default = automatic_masks(model, processor, image, "cpu", config, progress=False)
    assert [m.segmentation for m in whole] == [m.segmentation for m in default]

    layered = automatic_masks(
        *demo, image, "cpu", AutomaticConfig(points_per_side=8, crop_layers=1, min_score=0.5), progress=False
    )
    layer_one = [box for box, layer in crop_layers(image, AutomaticConfig(crop_layers=1)) if layer == 1]
    assert any(m.crop_box in layer_one for m in layered)  # the crops contribute
    with pytest.raises(UserError, match=r"crop box \[0, 0, 300, 10\] is not"):
        automatic_masks(model, processor, image, "cpu", config, crop_boxes=[[0, 0, 300, 10]], progress=False)
    with pytest.raises(UserError, match="--dedup-iou 0"):
        automatic_masks(model, processor, image, "cpu", AutomaticConfig(dedup_iou=0), progress=False)


@pytest.mark.parametrize("family", ["sam_hq", "sam2", "sam3_tracker"])
def test_every_family(family, tmp_path):
    """Each family's geometry (SAM-HQ pads, SAM 2 / 3 squash into a square): masks at the original size, equal to
    the family's own post-processing of the logits they came from; crop layers too."""
    model, processor = load_trained(str(save_tiny(tmp_path / family, family, seed=1)), None)
    image = _benchmark().photo(90, 130)
    config = AutomaticConfig(points_per_side=3, crop_layers=1, **NO_FILTER)
    found = automatic_masks(model.eval(), processor, image, "cpu", config, progress=False)
    assert found
    inputs = processor(images=image, return_tensors="pt")
    for mask in found:
        assert mask.segmentation["size"] == [90, 130]
        if mask.logits is not None:
            expected = post_process_masks(
                processor, mask.logits[None, None, None], inputs["original_sizes"], inputs.get("reshaped_input_sizes")
            )[0][0, 0]
            assert (mask.mask() == expected.numpy()).mean() > 0.999


def test_class_agnostic_coco_metrics(coco, tmp_path):
    """The annotations themselves as results score AP 1 and AR 1 whatever their category (class-agnostic), and
    the prompted metric still counts categories."""
    annotation_file, _ = coco
    data = json.loads(Path(annotation_file).read_text())
    truth = [a for a in data["annotations"] if not a.get("iscrowd")]
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    results = []
    for ann in truth:
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):
            segmentation = mask_utils.merge(mask_utils.frPyObjects(segmentation, *sizes[ann["image_id"]]))
        elif isinstance(segmentation["counts"], list):
            segmentation = mask_utils.frPyObjects(segmentation, *segmentation["size"])
        mask = torch.from_numpy(mask_utils.decode(segmentation).astype(bool))
        results.append({"image_id": ann["image_id"], "category_id": 999, "segmentation": encode_rle(mask), "score": 1})
    agnostic = coco_metrics(annotation_file, results, class_agnostic=True)
    assert set(agnostic) == {"AP", "AP50", "AP75", "AR10", "AR100", "AR1000"}
    assert agnostic["AP"] == pytest.approx(1.0) and agnostic["AR1000"] == pytest.approx(1.0)
    assert coco_metrics(annotation_file, results)["AP"] <= 0  # category 999 matches nothing
