import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samtune.config import ConfigError, DataConfig, load_config
from samtune.data.prompts import (
    PAD_LABEL,
    box_from_mask,
    farthest_interior_point,
    jitter_box,
    keep_prompt_kind,
    make_prompts,
)


def _rect(h=40, w=60, y0=5, y1=20, x0=10, x1=30):
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_box_is_inclusive_and_agrees_with_coco_bbox():
    mask = _rect()
    np.testing.assert_array_equal(box_from_mask(mask), [10, 5, 29, 19])
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
    np.testing.assert_array_equal(box_from_mask(mask), [x, y, x + w - 1, y + h - 1])


def test_jitter_stays_within_fraction_and_image():
    rng = np.random.default_rng(0)
    box = np.array([10, 5, 29, 19], np.float32)
    for _ in range(200):
        out = jitter_box(box, 0.2, rng, height=40, width=60)
        assert np.all(np.abs(out - box) <= 0.2 * np.array([20, 15, 20, 15]) + 1e-4)
        assert out[0] <= out[2] and out[1] <= out[3]
    edge = np.array([0, 0, 59, 39], np.float32)
    for _ in range(50):
        out = jitter_box(edge, 0.3, rng, height=40, width=60)
        assert out.min() >= 0 and out[2] <= 59 and out[3] <= 39


def test_farthest_point_is_the_centre_of_a_rectangle_and_inside_a_ring():
    np.testing.assert_array_equal(farthest_interior_point(_rect(y0=10, y1=21, x0=10, x1=31)), [20, 15])
    yy, xx = np.mgrid[0:61, 0:61]
    ring = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 28**2) & ((yy - 30) ** 2 + (xx - 30) ** 2 >= 15**2)
    x, y = farthest_interior_point(ring).astype(int)
    assert ring[y, x]


def test_farthest_point_treats_the_image_border_as_boundary():
    mask = np.zeros((30, 30), bool)
    mask[:, :12] = True  # touches the top, bottom and left borders
    x, y = farthest_interior_point(mask)
    assert 4 <= x <= 7 and 12 <= y <= 17


def test_eval_prompts_are_fixed():
    masks = np.stack([_rect(), _rect(y0=25, y1=38, x0=35, x1=58)])
    config = DataConfig(prompt="box+point", num_points=3, num_negative_points=2)
    a, b = make_prompts(masks, config, None), make_prompts(masks, config, None)
    for key in ("boxes", "points", "point_labels"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a["boxes"], [[10, 5, 29, 19], [35, 25, 57, 37]])
    assert a["points"].shape == (2, 1, 2) and a["point_labels"].tolist() == [[1], [1]]


def test_training_points_fall_where_they_must():
    mask = np.zeros((50, 50), bool)
    mask[10:40, 10:40] = True
    mask[20:30, 20:30] = False  # a hole: negatives can come from it
    config = DataConfig(prompt="point", num_points=4, num_negative_points=3)
    rng = np.random.default_rng(1)
    for _ in range(30):
        prompts = make_prompts(mask[None], config, rng)
        points, labels = prompts["points"][0].astype(int), prompts["point_labels"][0]
        assert labels.tolist() == [1, 1, 1, 1, 0, 0, 0]
        assert all(mask[y, x] for x, y in points[:4])
        assert all(not mask[y, x] and 10 <= x < 40 and 10 <= y < 40 for x, y in points[4:])


def test_missing_negatives_are_padding():
    config = DataConfig(prompt="point", num_points=1, num_negative_points=2)
    prompts = make_prompts(_rect()[None], config, np.random.default_rng(0))  # box == mask: no negative exists
    assert prompts["point_labels"].tolist() == [[1, PAD_LABEL, PAD_LABEL]]


def test_modes():
    masks = _rect()[None]
    rng = np.random.default_rng(0)
    assert set(make_prompts(masks, DataConfig(prompt="box"), rng)) == {"boxes"}
    assert set(make_prompts(masks, DataConfig(prompt="point"), rng)) == {"points", "point_labels"}
    assert set(make_prompts(masks, DataConfig(prompt="box+point"), rng)) == {"boxes", "points", "point_labels"}
    assert make_prompts(masks, DataConfig(prompt="none"), rng) == {}
    with pytest.raises(ConfigError, match="data.prompt: expected one of 'box', 'point'"):
        load_config(overrides={"data.prompt": "scribble"})


def test_mixed_mode_samples_both_in_training_and_boxes_in_evaluation():
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:8, 3:9] = True
    masks[1, 10:18, 10:15] = True
    config = DataConfig(prompt="mixed")
    training = make_prompts(masks, config, np.random.default_rng(0))
    assert set(training) == {"boxes", "points", "point_labels"}
    evaluation = make_prompts(masks, config, None)
    assert set(evaluation) == {"boxes"}
    np.testing.assert_array_equal(evaluation["boxes"], [[3, 2, 8, 7], [10, 10, 14, 17]])


def test_keep_prompt_kind_drops_the_other_prompts():
    batch = {"input_boxes": 1, "input_points": 2, "input_labels": 3, "pixel_values": 4}
    assert set(keep_prompt_kind(batch, "box")) == {"input_boxes", "pixel_values"}
    assert set(keep_prompt_kind(batch, "point")) == {"input_points", "input_labels", "pixel_values"}
    assert keep_prompt_kind(batch, "box+point") == batch
    with pytest.raises(ValueError, match="prompt kind"):
        keep_prompt_kind(batch, "mask")
