"""Per-image samples against pycocotools, and the counted skips."""

import json
import logging

import numpy as np
from pycocotools.coco import COCO

from samtune.data.coco import CocoInstanceDataset


def test_masks_ids_and_crowd_match_pycocotools(coco):
    annotation_file, image_dir = coco
    reference = COCO(str(annotation_file))
    dataset = CocoInstanceDataset(annotation_file, image_dir)
    assert [image.image_id for image in dataset.images] == reference.getImgIds()
    assert dataset.categories == {c["id"]: c["name"] for c in reference.loadCats(reference.getCatIds())}
    total = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        anns = reference.loadAnns(reference.getAnnIds(imgIds=sample["image_id"]))
        things = [a for a in anns if not a["iscrowd"]]
        crowd = [a for a in anns if a["iscrowd"]]
        assert sample["annotation_ids"].tolist() == [a["id"] for a in things]
        assert sample["category_ids"].tolist() == [a["category_id"] for a in things]
        for mask, ann in zip(sample["masks"], things):
            np.testing.assert_array_equal(mask, reference.annToMask(ann).astype(bool))
        expected_ignore = np.zeros(sample["image"].shape[:2], bool)
        for ann in crowd:
            expected_ignore |= reference.annToMask(ann).astype(bool)
        np.testing.assert_array_equal(sample["ignore"], expected_ignore)
        total += len(things)
    assert total == dataset.index.num_instances > 0
    assert sum(1 for i in range(len(dataset)) if not dataset.images[i].instances) >= 2


def test_skips_are_counted_and_geometry_is_clipped(coco_copy, caplog):
    path, image_dir, data = coco_copy
    image = data["images"][0]
    w, h = image["width"], image["height"]
    extra = [
        # entirely outside the image: rasterises to nothing
        {"segmentation": [[w + 5, 1, w + 9, 1, w + 9, 6]], "tag": "zero"},
        # fewer than three points
        {"segmentation": [[1, 1, 5, 5]], "tag": "degenerate"},
        # sticks out of the image on the left: clipped, kept
        {"segmentation": [[-10, 2, 10, 2, 10, 12, -10, 12]], "tag": "clipped"},
    ]
    for number, ann in enumerate(extra):
        ann.update(id=90000 + number, image_id=image["id"], category_id=data["categories"][0]["id"], iscrowd=0)
    clipped = extra[2]
    data["annotations"] += [{k: v for k, v in a.items() if k != "tag"} for a in extra]
    path.write_text(json.dumps(data))
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    with caplog.at_level(logging.INFO, logger="samtune"):
        dataset = CocoInstanceDataset(path, image_dir)
    assert dataset.index.skipped["zero_area"] == 1
    assert dataset.index.skipped["degenerate"] == 1
    assert dataset.index.skipped["crowd"] == crowd
    assert dataset.index.skipped["clipped"] == 1
    line = " ".join(record.getMessage() for record in caplog.records)
    assert "1 zero-area masks" in line and "1 degenerate geometry" in line and f"{crowd} crowd" in line
    sample = dataset[0]
    position = sample["annotation_ids"].tolist().index(clipped["id"])
    expected = np.zeros((h, w), bool)
    expected[2:12, 0:10] = True  # pycocotools fills the polygon's pixels inside the image
    assert abs(int(sample["masks"][position].sum()) - int(expected.sum())) <= 12
    assert not sample["masks"][position][:, 12:].any()
