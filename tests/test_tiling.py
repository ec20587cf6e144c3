"""Tiled inference: the windows, where each prompt goes, masks back in place, and tiled evaluation against the
untiled one where both see the same pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samtune.demo.bases import BASES
from samtune.errors import UserError
from samtune.evaluate import main as evaluate_main
from samtune.predict import Instance, prompted_masks, tiled_masks
from samtune.testing.large_images import LargeSpec, make_large_coco
from samtune.tiling import Tiling, Window

DEMO_BASE = BASES["sam"].folder


@pytest.mark.parametrize(
    ("height", "width", "size", "overlap"), [(100, 250, 64, 16), (64, 64, 64, 0), (30, 500, 128, 100)]
)
def test_grid_covers_the_image_with_the_overlap_asked(height, width, size, overlap):
    tiles = Tiling(size, overlap).grid(height, width)
    covered = np.zeros((height, width), int)
    for tile in tiles:
        covered[tile.y0 : tile.y1, tile.x0 : tile.x1] += 1
        assert tile.size == (min(size, height), min(size, width))  # full tiles, the last flush with the edge
    assert covered.min() >= 1
    xs = sorted({t.x0 for t in tiles})
    assert all(b - a <= size - overlap for a, b in zip(xs, xs[1:]))  # neighbours share at least the overlap
    assert xs[-1] + min(size, width) == width


def test_every_object_up_to_the_overlap_lies_whole_in_its_tile():
    tiling, rng = Tiling(96, 32), np.random.default_rng(0)
    for _ in range(500):
        w, h = rng.integers(1, 33, 2)
        x0, y0 = rng.integers(0, 400 - w), rng.integers(0, 300 - h)
        box = (float(x0), float(y0), float(x0 + w - 1), float(y0 + h - 1))
        window = tiling.window_for(box, 300, 400)
        assert window in tiling.grid(300, 400)
        assert window.x0 <= box[0] and box[2] < window.x1 and window.y0 <= box[1] and box[3] < window.y1


def test_the_tile_with_the_widest_margin_is_chosen():
    tiling = Tiling(100, 50)  # tiles start at 0, 50, 100 along a 200 px side
    window = tiling.window_for((110.0, 110.0, 130.0, 130.0), 200, 200)  # in the tiles at 50 and at 100
    assert (window.x0, window.y0) == (50, 50)  # 19 px to the nearest edge there, 10 px in the tile at 100


def test_a_box_larger_than_a_tile_gets_its_own_window_with_context():
    tiling = Tiling(64, 16)
    window = tiling.window_for((10.0, 20.0, 150.0, 40.0), 100, 300)
    assert window.x0 == 0 and window.x1 >= 151 + 16  # context on the free side, clipped at the border
    assert window.y0 <= 20 - 16 and window.y1 >= 41 + 16 and window.y1 - window.y0 >= 64
    assert window.x0 >= 0 and window.x1 <= 300 and window.y0 >= 0 and window.y1 <= 100


def test_automatic_regions_are_the_whole_image_then_the_tiles():
    tiling = Tiling(64, 16)
    regions = tiling.regions(100, 150)
    assert regions[0] == [0, 0, 150, 100]  # objects larger than the overlap: whole there
    assert regions[1:] == [list(tile.box) for tile in tiling.grid(100, 150)] and len(regions) == 7
    assert tiling.regions(50, 60) == [[0, 0, 60, 50]]  # one tile: the image, once


def test_bad_tilings_are_one_clear_error():
    with pytest.raises(UserError, match="--overlap 64: must be at least 0 and less than the tile size 64"):
        Tiling(64, 64)
    with pytest.raises(UserError, match="--tile 8"):
        Tiling(8)


def test_paste_and_union_place_window_masks_in_the_image():
    window = Window(5, 7, 9, 10)
    mask = np.ones((3, 4), bool)
    whole = window.paste(mask, 12, 15)
    assert whole.sum() == 12 and whole[7:10, 5:9].all()
    region = window.union(Window(2, 8, 6, 12))
    assert region == Window(2, 7, 9, 12)
    assert np.array_equal(region.paste_from(window, mask), whole[7:12, 2:9])
    assert Window.around(whole) == window and window.union(Window(0, 0, 0, 0)) == window


def test_tiled_masks_are_the_crop_s_masks_put_back_in_place(tiny_sam, processor):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    instances = [Instance(id=0, box=[20.0, 30.0, 60.0, 70.0]), Instance(id=1, points=[[250.0, 150.0]], labels=[1])]
    tiling = Tiling(100, 20)
    found = tiled_masks(tiny_sam, processor, image, instances, tiling, "cpu")
    for instance, (window, item) in zip(instances, found):
        assert item.mask.shape == window.size
        local = Instance(
            id=instance.id,
            box=None if instance.box is None else window.to_window(instance.box),
            points=[window.to_window(p) for p in instance.points],
            labels=instance.labels,
        )
        (alone,) = prompted_masks(tiny_sam, processor, np.ascontiguousarray(window.crop(image)), [local], "cpu")
        assert torch.equal(item.mask, alone.mask) and item.score == pytest.approx(alone.score, abs=1e-6)
    assert found[0][0].x0 <= 20 and found[1][0].x1 > 250


def _evaluate(model_dir, annotations, images, *extra):
    return evaluate_main(
        ["--model", str(model_dir), "--annotations", str(annotations), "--images", str(images), *extra]
    )


def test_tiled_evaluation_equals_the_untiled_one_when_the_tile_holds_the_image(tiny_sam_dir, coco, tmp_path):
    for prompt in ("box", "point"):
        plain = _evaluate(tiny_sam_dir, *coco, "--prompt", prompt)
        tiled = _evaluate(tiny_sam_dir, *coco, "--prompt", prompt, "--tile", "512", "--coco")
        assert tiled["num_instances"] == plain["num_instances"] > 0
        assert tiled["mIoU"] == pytest.approx(plain["mIoU"], abs=1e-6)
        assert tiled["mF1"] == pytest.approx(plain["mF1"], abs=1e-6)
        assert tiled["latency"]["tiling"]["windows_per_image"]["median"] == 1
        assert "AP" in tiled["coco"]


def test_a_large_image_is_scored_at_full_size(tiny_sam_dir, tiny_sam, processor, tmp_path):
    """Tiled evaluation against a by-hand reference: each box's window, the crop's mask pasted into the whole
    image, IoU there with the crowd region ignored."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from samtune.data.prompts import box_from_mask

    annotations, images = make_large_coco(tmp_path, LargeSpec(num_images=1, side=512, objects=6, crowd_every=1))
    result = _evaluate(tiny_sam_dir, annotations, images, "--tile", "128", "--overlap", "64")
    data = json.loads(annotations.read_text())
    image = np.asarray(Image.open(images / data["images"][0]["file_name"]).convert("RGB"))
    masks = {a["id"]: mask_utils.decode(a["segmentation"]).astype(bool) for a in data["annotations"]}
    crowd = np.any([masks[a["id"]] for a in data["annotations"] if a["iscrowd"]], axis=0)
    tiling, ious = Tiling(128, 64), []
    for annotation in (a for a in data["annotations"] if not a["iscrowd"]):
        truth = masks[annotation["id"]]
        window = tiling.window_for(tuple(box_from_mask(truth).tolist()), *truth.shape)
        local = Instance(id=0, box=window.to_window(box_from_mask(truth).tolist()))
        (found,) = prompted_masks(tiny_sam, processor, np.ascontiguousarray(window.crop(image)), [local], "cpu")
        predicted = window.paste(found.mask.numpy(), *truth.shape) & ~crowd
        inter, union = (predicted & truth & ~crowd).sum(), (predicted | (truth & ~crowd)).sum()
        ious.append(inter / union if union else 1.0)
    assert result["num_instances"] == len(ious) == 5
    assert result["mIoU"] == pytest.approx(np.mean(ious), abs=1e-9)
    assert 1 <= result["latency"]["tiling"]["windows_per_image"]["median"] <= 5


def test_tile_options_that_do_not_fit_together_are_refused(tiny_sam_dir, coco):
    with pytest.raises(UserError, match="--overlap 10 without --tile"):
        _evaluate(tiny_sam_dir, *coco, "--overlap", "10")
    with pytest.raises(UserError, match="--clicks with --tile"):
        _evaluate(tiny_sam_dir, *coco, "--tile", "64", "--clicks", "1")
    with pytest.raises(UserError, match="--prompt none"):
        _evaluate(tiny_sam_dir, *coco, "--tile", "64", "--prompt", "none")


def test_predict_tiled_writes_whole_image_masks_inside_each_prompt_s_window(tiny_sam_dir, tmp_path):
    from pycocotools import mask as mask_utils

    from samtune.predict import main as predict_main

    annotations, images = make_large_coco(tmp_path / "data", LargeSpec(num_images=1, side=384, objects=4))
    data = json.loads(annotations.read_text())
    name = data["images"][0]["file_name"]
    boxes = [
        [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2] - 1, a["bbox"][1] + a["bbox"][3] - 1]
        for a in data["annotations"]
    ]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({name: boxes}))
    common = ["--model", str(tiny_sam_dir), "--images", str(images), "--tile", "128", "--overlap", "64"]
    results = predict_main([*common, "--prompts", str(prompts), "--output", str(tmp_path / "tiled.json")])
    tiling = Tiling(128, 64)
    assert len(results) == len(boxes) == 4
    for result, box in zip(results, boxes):
        mask = mask_utils.decode(result["segmentation"]).astype(bool)
        assert mask.shape == (384, 384)
        window = tiling.window_for(tuple(box), 384, 384)
        outside = mask.copy()
        outside[window.y0 : window.y1, window.x0 : window.x1] = False
        assert not outside.any()  # nothing predicted outside the prompt's window
    # automatic masks over the tiles, with the shipped demo base (it knows these shapes): whole-image RLEs, every
    # object found, and the copies that the overlapping tiles each hold merged
    demo = ["--model", str(DEMO_BASE), "--images", str(images), "--points-per-side", "8", "--min-score", "0.7"]
    demo += ["--min-stability", "0.9", "--output", str(tmp_path / "a.json")]
    tiled = Tiling(192, 96)
    automatic = predict_main([*demo, "--tile", "192", "--overlap", "96"])
    truth = [mask_utils.decode(a["segmentation"]).astype(bool) for a in data["annotations"]]
    found = [mask_utils.decode(r["segmentation"]).astype(bool) for r in automatic]
    assert all(m.shape == (384, 384) for m in found)
    iou = np.array([[(m & t).sum() / (m | t).sum() for m in found] for t in truth])
    assert iou.max(axis=1).min() > 0.5
    holding = [sum(tile.union(Window.around(t)) == tile for tile in tiled.grid(384, 384)) for t in truth]
    assert (iou > 0.5).sum() < sum(holding)  # each object lies whole in 2-4 tiles: not one mask per tile
    whole = predict_main(demo)  # the 384 px image as one 256 px thumbnail: small objects are lost
    seen = [mask_utils.decode(r["segmentation"]).astype(bool) for r in whole]
    assert sum(any((m & t).sum() / (m | t).sum() > 0.5 for m in seen) for t in truth) < len(truth)
    with pytest.raises(UserError, match="--tile with --previous or --save-logits"):
        predict_main([*common, "--prompts", str(prompts), "--save-logits", "--output", str(tmp_path / "b.json")])


def test_tiles_on_a_square_input_family(coco, tmp_path):
    """SAM 2 resizes every window to its square input (no padding): a tile holding the image scores as untiled,
    and smaller tiles score every instance."""
    from samtune.testing.tiny import save_tiny

    model = save_tiny(tmp_path / "sam2", "sam2", seed=1)
    plain = _evaluate(model, *coco)
    whole = _evaluate(model, *coco, "--tile", "512")
    tiled = _evaluate(model, *coco, "--tile", "64", "--overlap", "16")
    assert whole["mIoU"] == pytest.approx(plain["mIoU"], abs=1e-6) and whole["mF1"] == pytest.approx(
        plain["mF1"], abs=1e-6
    )
    assert tiled["num_instances"] == plain["num_instances"] > 0
    assert tiled["latency"]["tiling"]["windows_per_image"]["p90"] > 1
