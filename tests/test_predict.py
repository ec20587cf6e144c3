"""predict: every prompt mode writes COCO results with masks of each image's original size."""

import json
import math

import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from safetensors import safe_open

from samtune.predict import main as predict
from samtune.predict import read_prompts


def _sizes(coco_file):
    data = json.loads(coco_file.read_text())
    return {image["file_name"]: (image["height"], image["width"]) for image in data["images"]}, data


def _check(results, sizes):
    assert results
    for r in results:
        assert tuple(r["segmentation"]["size"]) == sizes[r["file_name"]]
        assert mask_utils.decode(r["segmentation"]).shape == sizes[r["file_name"]]
        assert math.isfinite(r["score"])  # the IoU head's prediction (a random model's may be negative)


def test_box_and_point_prompts(coco, tiny_sam_dir, tmp_path):
    annotation_file, image_dir = coco
    sizes, data = _sizes(annotation_file)
    names = list(sizes)[:4]
    prompts = {
        names[0]: [[2, 3, 30, 25]],
        names[1]: {"boxes": [[0, 0, 10, 10]], "points": [[5, 5], [20, 12]]},
        names[2]: {"points": [[1, 1]]},
        names[3]: [],
    }
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    out = tmp_path / "masks.json"
    results = predict(
        [
            "--model",
            str(tiny_sam_dir),
            "--images",
            str(image_dir),
            "--prompts",
            str(path),
            "--output",
            str(out),
            "--overlays",
            str(tmp_path / "overlays"),
        ]
    )
    _check(results, sizes)
    counts = {name: sum(r["file_name"] == name for r in results) for name in names}
    assert counts == {names[0]: 1, names[1]: 3, names[2]: 1, names[3]: 0}
    assert json.loads(out.read_text()) == results
    assert (tmp_path / "overlays" / names[0]).with_suffix(".png").exists()


def test_coco_boxes_as_prompts_load_as_coco_results(coco, tiny_sam_dir, tmp_path):
    annotation_file, image_dir = coco
    sizes, data = _sizes(annotation_file)
    out = tmp_path / "masks.json"
    results = predict(
        ["--model", str(tiny_sam_dir), "--images", str(image_dir), "--coco", str(annotation_file), "--output", str(out)]
    )
    _check(results, sizes)
    assert len(results) == len(data["annotations"])
    assert sorted({r["category_id"] for r in results}) == sorted({a["category_id"] for a in data["annotations"]})
    loaded = COCO(str(annotation_file)).loadRes(str(out))
    assert len(loaded.getAnnIds()) == len(results)


def test_automatic_masks_on_a_single_image(coco, tiny_sam_dir, tmp_path):
    annotation_file, image_dir = coco
    sizes, data = _sizes(annotation_file)
    name = next(n for n in sizes if n.endswith(".jpg"))  # an EXIF-rotated photo among them
    results = predict(
        [
            "--model",
            str(tiny_sam_dir),
            "--images",
            str(image_dir / name),
            "--points-per-side",
            "4",
            "--min-score",
            "-10",
            "--min-stability",
            "-1",
            "--crop-layers",
            "1",
            "--output",
            str(tmp_path / "auto.json"),
            "--save-logits",
        ]
    )
    _check(results, {name.split("/")[-1]: sizes[name]})
    assert [r["instance_id"] for r in results] == list(range(len(results)))
    assert all(r["category_id"] == 1 and len(r["crop_box"]) == 4 and "stability_score" in r for r in results)
    # logits only for the masks found on the whole image (those of a crop are not in the model's mask frame)
    height, width = sizes[name]
    whole = {r["instance_id"] for r in results if r["crop_box"] == [0, 0, width, height]}
    with safe_open(str(tmp_path / "auto.logits.safetensors"), framework="pt") as saved:
        assert {json.loads(key)[1] for key in saved.keys()} == whole  # noqa: SIM118


def test_bad_prompt_files_are_refused(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"a.jpg": [[10, 10, 5, 20]]}))
    with pytest.raises(ValueError, match=r"'a.jpg': box \[10, 10, 5, 20\] is not \[x0, y0, x1, y1\]"):
        read_prompts(path)
    path.write_text(json.dumps({"a.jpg": {"circles": []}}))
    with pytest.raises(ValueError, match="must be a list of boxes"):
        read_prompts(path)


def _agreement(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """Mean pixel agreement of paired masks, largest score difference."""
    agree = [(mask_utils.decode(x["segmentation"]) == mask_utils.decode(y["segmentation"])).mean() for x, y in
             zip(a, b)]  # fmt: skip
    return float(sum(agree) / len(agree)), max(abs(x["score"] - y["score"]) for x, y in zip(a, b))


def test_bf16_masks_as_close_to_fp32_as_plain_sams(coco, tiny_sam_dir, tmp_path):
    """--precision bf16 really runs in bf16, and the fast encoder's bf16 masks are as close to fp32 as those
    of transformers' own encoder in bf16 (the tiny random model's logits hover near 0, so rounding flips
    pixels and the IoU head amplifies it either way)."""
    annotation_file, image_dir = coco
    sizes, _ = _sizes(annotation_file)
    argv = ["--model", str(tiny_sam_dir), "--images", str(image_dir), "--coco", str(annotation_file)]
    fp32 = predict([*argv, "--output", str(tmp_path / "fp32.json")])
    bf16 = predict([*argv, "--output", str(tmp_path / "bf16.json"), "--precision", "bf16"])
    plain = predict([*argv, "--output", str(tmp_path / "plain.json"), "--precision", "bf16", "--no-fast-encoder"])
    _check(bf16, sizes)
    assert [(r["file_name"], r["category_id"]) for r in bf16] == [(r["file_name"], r["category_id"]) for r in fp32]
    fast_agree, fast_gap = _agreement(fp32, bf16)
    plain_agree, plain_gap = _agreement(fp32, plain)
    assert fast_gap > 0  # bf16 was used
    assert fast_agree >= plain_agree - 0.01 and fast_agree > 0.9
    assert fast_gap <= 1.5 * plain_gap + 1e-3
