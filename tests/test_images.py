"""Every stored image mode comes back as upright RGB, with masks aligned to it."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samtune.data.coco import CocoInstanceDataset
from samtune.data.images import read_rgb, read_rgb_image, to_rgb


def test_every_mode_gives_the_reference_rgb(coco):
    annotation_file, image_dir = coco
    dataset = CocoInstanceDataset(annotation_file, image_dir)
    seen = set()
    for index in range(len(dataset)):
        sample = dataset[index]
        reference = np.load(annotation_file.parent / "reference" / f"{sample['image_id']}.npy")
        assert sample["image"].dtype == np.uint8 and sample["image"].shape == reference.shape
        np.testing.assert_array_equal(sample["image"], reference)
        seen.add(dataset.images[index].file_name.split("/")[0])
    assert seen == {"rgb", "gray", "alpha", "palette", "deep", "photos"}


def test_the_pil_reading_gives_the_same_pixels(coco):
    """read_rgb_image (the uint8 data path resizes it without a copy through numpy) = read_rgb, every mode."""
    dataset = CocoInstanceDataset(*coco)
    for index, image in enumerate(dataset.images):
        pil = read_rgb_image(image.path)
        assert pil.mode == "RGB" and (pil.height, pil.width) == image.size
        expected = read_rgb(image.path)
        np.testing.assert_array_equal(np.asarray(pil), expected)
        np.testing.assert_array_equal(np.asarray(dataset.sample(index, as_image=True)["image"]), expected)


def test_masks_are_aligned_with_the_pixels(coco):
    """Each shape is one flat colour: pixels under its mask sit close to the mask's median colour,
    pixels just beside it (the mask shifted sideways) do not."""
    dataset = CocoInstanceDataset(*coco)
    checked = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        image = sample["image"].astype(float)
        for mask in sample["masks"]:
            cols = np.flatnonzero(mask.any(axis=0))
            beside = np.roll(mask, max(3, (cols[-1] - cols[0]) // 2), axis=1) & ~mask
            if mask.sum() < 60 or beside.sum() < 20:
                continue
            colour = np.median(image[mask], axis=0)
            inside = np.median(np.abs(image[mask] - colour).sum(axis=1))
            outside = np.median(np.abs(image[beside] - colour).sum(axis=1))
            assert inside < outside / 2
            checked += 1
    assert checked >= 10


def test_exif_image_annotated_on_stored_pixels(coco, tmp_path):
    """JSON sizes of the un-rotated file mean the annotations are on stored pixels: masks turn with the image."""
    annotation_file, image_dir = coco
    data = json.loads(annotation_file.read_text())
    annotated = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
    image = next(
        i
        for i in data["images"]
        if i["id"] in annotated and Image.open(image_dir / i["file_name"]).getexif().get(0x0112) == 6
    )
    upright = CocoInstanceDataset(annotation_file, image_dir)
    index = [i.image_id for i in upright.images].index(image["id"])
    expected = upright[index]["masks"]
    assert len(expected) and image["width"] != image["height"]
    # The same annotations expressed on the stored (rotated back) pixels.
    image["width"], image["height"] = image["height"], image["width"]
    anns = [a for a in data["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
    for ann, mask in zip(anns, expected):
        stored = np.rot90(mask, k=1)  # undo a 90-degree clockwise display rotation
        rle = mask_utils.encode(np.asfortranarray(stored.astype(np.uint8)))
        ann["segmentation"] = {"size": list(stored.shape), "counts": rle["counts"].decode()}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != image["id"] or not a["iscrowd"]]
    path = tmp_path / "stored.json"
    path.write_text(json.dumps(data))
    dataset = CocoInstanceDataset(path, image_dir)
    sample = dataset[index]
    assert sample["image"].shape[:2] == expected.shape[1:]
    np.testing.assert_array_equal(sample["masks"], expected)


@pytest.mark.parametrize("mode", ["I", "F", "LA", "CMYK", "1"])
def test_other_modes_convert(mode):
    gray = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    image = Image.fromarray(gray).convert(mode)
    rgb = to_rgb(image)
    assert rgb.shape == (5, 5, 3) and rgb.dtype == np.uint8
    if mode in ("I", "F", "LA"):
        np.testing.assert_array_equal(rgb[..., 0], gray)


def test_palette_with_transparency(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (255, 0, 0)
    image = Image.fromarray(rgb).quantize(colors=2)
    image.info["transparency"] = 0
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    out = read_rgb(path)
    assert out.shape == (4, 4, 3)
    assert {tuple(p) for p in out.reshape(-1, 3)} <= {(255, 0, 0), (0, 0, 0)}
