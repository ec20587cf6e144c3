"""Random training crops (``data.crop_size``): the window of the whole sample, instances and crowd cut to it, the
ones left under the visible minimum dropped and counted, and large images read one at a time without full-size
copies."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samtune.data.coco import CocoInstanceDataset


@pytest.fixture(scope="module")
def source(coco):
    return CocoInstanceDataset(*coco)


def _check_window(full: dict, cut: dict, crop: int, min_visible: int) -> None:
    height, width = full["size"]
    top, left, crop_h, crop_w = cut["window"]
    assert (crop_h, crop_w) == cut["size"] == (min(crop, height), min(crop, width))
    assert 0 <= top <= height - crop_h and 0 <= left <= width - crop_w
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    assert np.array_equal(cut["image"], full["image"][window])
    assert np.array_equal(cut["ignore"], full["ignore"][window])
    masks = dict(zip(full["annotation_ids"].tolist(), full["masks"]))
    kept = cut["annotation_ids"].tolist()
    assert cut["masks"].shape == (len(kept), crop_h, crop_w) and len(cut["category_ids"]) == len(kept)
    for annotation, mask in zip(kept, cut["masks"]):
        assert np.array_equal(mask, masks[annotation][window]) and mask.any()
    shown = {a: int(m[window].sum()) for a, m in masks.items()}
    areas = {a: int(m.sum()) for a, m in masks.items()}
    passing = {a for a in masks if shown[a] and shown[a] >= min(min_visible, areas[a])}
    # every instance with enough pixels in the window is kept; at most one (the window's anchor) keeps fewer
    assert passing <= set(kept) and len(set(kept) - passing) <= 1
    assert cut["dropped"] == len(masks) - len(kept)
    if masks:
        assert kept  # the window holds a pixel of one instance at least


@pytest.mark.parametrize("crop", [40, 64])
def test_a_crop_is_the_window_of_the_whole_sample(source, crop):
    """Every image of the set (RGB, gray, palette, 16-bit PNG, EXIF-turned JPEG, crowd), several draws each."""
    dropped = 0
    for index in range(len(source)):
        full = source.sample(index)
        for seed in range(3):
            cut = source.sample_crop(index, crop, np.random.default_rng([seed, index]), min_visible=16)
            _check_window(full, cut, crop, 16)
            dropped += cut["dropped"]
    assert dropped > 0


def test_an_image_no_larger_than_the_crop_is_whole(source):
    for index in range(len(source)):
        full, cut = source.sample(index), source.sample_crop(index, 1000, np.random.default_rng(0), 16)
        assert cut["dropped"] == 0 and cut["size"] == full["size"]
        for key in ("image", "masks", "ignore", "annotation_ids"):
            assert np.array_equal(cut[key], full[key]), key


def test_crops_without_pixels_and_as_pil_images(source):
    index = next(i for i, image in enumerate(source.images) if image.instances and min(image.size) > 48)
    reference = source.sample_crop(index, 48, np.random.default_rng(1), 16)
    annotations_only = source.sample_crop(index, 48, np.random.default_rng(1), 16, pixels=False)
    as_image = source.sample_crop(index, 48, np.random.default_rng(1), 16, as_image=True)
    assert annotations_only["image"] is None and annotations_only["window"] == reference["window"]
    assert np.array_equal(annotations_only["masks"], reference["masks"])
    assert np.array_equal(np.asarray(as_image["image"]), reference["image"])


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> tuple[Path, Path]:
    """Two 4000 x 3000 JPEG images with six rectangles each."""
    root = tmp_path_factory.mktemp("large")
    (root / "images").mkdir()
    height, width = 3000, 4000
    images, annotations = [], []
    for number in range(2):
        pixels = np.full((height, width, 3), 80 + 40 * number, np.uint8)
        for k in range(6):
            mask = np.zeros((height, width), np.uint8)
            top, left = 200 + 450 * k, 300 + 600 * k
            mask[top : top + 300 + 20 * number, left : left + 400] = 1
            pixels[mask.astype(bool)] = (220, 40 * k, 60)
            counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
            annotations.append({"id": 100 * number + k, "image_id": number, "category_id": 1,
                                "segmentation": {"size": [height, width], "counts": counts}})  # fmt: skip
        Image.fromarray(pixels).save(root / "images" / f"{number}.jpg", quality=90)
        images.append({"id": number, "file_name": f"{number}.jpg", "width": width, "height": height})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}
    (root / "annotations.json").write_text(json.dumps(data))
    return root / "annotations.json", root / "images"


def test_a_large_image_is_cut_without_full_size_copies(large):
    source = CocoInstanceDataset(*large)
    full = source.sample(0)
    one_image = full["image"].nbytes  # 36 MB: one full-size RGB array
    tracemalloc.start()
    cut = source.sample_crop(0, 512, np.random.default_rng(0), 16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _check_window(full, cut, 512, 16)
    # at most one full-size mask at a time (12 MB), never a full-size image array or all masks (whole: 108 MB)
    assert peak < one_image / 2 < full["masks"].nbytes
    assert cut["dropped"] >= 4  # six rectangles across the image; a 512-px window holds one or two


def test_training_on_random_crops_of_large_images(large, coco, train_tiny, tmp_path):
    out = tmp_path / "run"
    results = train_tiny(out, large, coco, **{"data.crop_size": 256, "train.max_steps": 2, "train.batch_size": 2,
                                               "train.log_every": 1})  # fmt: skip
    summary = json.loads((out / "results.json").read_text())
    assert not results["interrupted"] and summary["steps"] == 2
    assert summary["dropped_instances"] >= 2 * 2 * 4  # every sample's window drops most of its six rectangles
