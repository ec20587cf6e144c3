"""COCO samples to padded SAM batches: values, padding, sampling, chunking, workers."""

import numpy as np
import pytest
import torch

from samtune.config import DataConfig
from samtune.data.batch import to_device
from samtune.data.coco import CocoInstanceDataset
from samtune.data.dataset import SamPromptDataset, make_loader
from samtune.data.prompts import PAD_LABEL


@pytest.fixture(scope="module")
def source(coco):
    return CocoInstanceDataset(*coco)


def _scale(batch, row):
    original = batch["original_sizes"][row].float()
    reshaped = batch["reshaped_input_sizes"][row].float()
    return (reshaped / original).flip(0)  # (x scale, y scale)


def _all_batches(dataset, batch_size=3, workers=0):
    return list(make_loader(dataset, batch_size=batch_size, num_workers=workers))


def test_eval_batches_hold_every_instance_once_with_exact_prompts(source, processor):
    dataset = SamPromptDataset(source, processor, DataConfig(prompt="box+point", max_instances=2), train=False)
    seen = []
    for batch in _all_batches(dataset):
        for row in range(len(batch["image_id"])):
            valid = batch["valid"][row]
            count = int(valid.sum())
            assert valid[:count].all() and not valid[count:].any()  # real instances first, then padding
            masks = batch["original_masks"][row]
            assert masks.shape[0] == count
            seen += batch["annotation_ids"][row][valid].tolist()
            scale = _scale(batch, row)
            for k in range(count):
                mask = masks[k].numpy()
                rows, cols = np.nonzero(mask)
                box = batch["input_boxes"][row, k] / scale.repeat(2)
                np.testing.assert_allclose(box.numpy(), [cols.min(), rows.min(), cols.max(), rows.max()], atol=1e-3)
                x, y = (batch["input_points"][row, k, 0] / scale).round().long().tolist()
                assert mask[y, x] and batch["input_labels"][row, k, 0] == 1
            # padding never looks like an instance
            assert not batch["low_res_masks"][row][~valid].any()
            assert (batch["category_ids"][row][~valid] == -1).all()
            assert (batch["input_labels"][row][~valid] == PAD_LABEL).all()
    expected = [inst.annotation_id for image in source.images for inst in image.instances]
    assert sorted(seen) == sorted(expected)


def test_low_res_labels_follow_the_masks(source, processor):
    dataset = SamPromptDataset(source, processor, DataConfig(prompt="box", max_instances=8), train=False)
    mask_side = processor.image_processor.mask_pad_size["height"]
    image_side = processor.image_processor.pad_size["height"]
    ratio = mask_side / image_side
    checked = 0
    for batch in _all_batches(dataset):
        low_res = batch["low_res_masks"]
        assert low_res.shape[-2:] == (mask_side, mask_side) and low_res.dtype == torch.bool
        for row in range(len(batch["image_id"])):
            scale = _scale(batch, row) * ratio
            for k in torch.nonzero(batch["valid"][row]).flatten().tolist():
                full = batch["original_masks"][row][k]
                low = batch["low_res_masks"][row, k]
                expected_area = full.sum().item() * scale[0].item() * scale[1].item()
                if expected_area < 30:
                    continue
                assert abs(low.sum().item() - expected_area) / expected_area < 0.25
                ys, xs = torch.nonzero(low, as_tuple=True)
                box = batch["input_boxes"][row, k] * ratio
                assert xs.min() >= box[0] - 1.5 and xs.max() <= box[2] + 1.5
                assert ys.min() >= box[1] - 1.5 and ys.max() <= box[3] + 1.5
                checked += 1
    assert checked > 10


def test_crowd_regions_become_a_low_res_ignore_map(source, processor):
    dataset = SamPromptDataset(source, processor, DataConfig(prompt="box"), train=False)
    with_crowd = [b for b in _all_batches(dataset, batch_size=1) if b["original_ignore"][0].any()]
    assert with_crowd
    for batch in with_crowd:
        assert batch["low_res_ignore"][0].any()
        overlap = batch["low_res_ignore"][0] & batch["low_res_masks"][0].any(dim=0)
        assert not overlap.sum() > 4  # crowd never overlaps shapes


def test_training_subsets_are_bounded_seeded_and_change_per_epoch(source, processor):
    config = DataConfig(prompt="box", box_jitter=0.1, max_instances=2)
    dataset = SamPromptDataset(source, processor, config, train=True, seed=5)
    assert all(len(source.images[i].instances) for i, _ in dataset.items)  # empty images left out
    many = next(n for n, (i, _) in enumerate(dataset.items) if len(source.images[i].instances) > 2)
    first = dataset[many]
    assert first["low_res_masks"].shape[0] == 2
    again = dataset[many]
    assert torch.equal(first["annotation_ids"], again["annotation_ids"])
    assert torch.equal(first["input_boxes"], again["input_boxes"])
    drawn = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        drawn.add(tuple(dataset[many]["annotation_ids"].tolist()))
    assert len(drawn) > 1


def test_batches_do_not_depend_on_worker_count(source, processor):
    config = DataConfig(prompt="box+point", num_points=2, num_negative_points=1, max_instances=3)
    dataset = SamPromptDataset(source, processor, config, train=True, seed=2)
    dataset.set_epoch(1)
    serial = _all_batches(dataset, batch_size=4, workers=0)
    parallel = _all_batches(dataset, batch_size=4, workers=2)
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_none_mode_targets_the_union_of_instances(source, processor):
    dataset = SamPromptDataset(source, processor, DataConfig(prompt="none"), train=False)
    assert len(dataset) == len(source)  # images without instances are kept: their target is empty
    for batch in _all_batches(dataset):
        assert batch["low_res_masks"].shape[1] == 1 and batch["valid"].all()
        assert "input_boxes" not in batch and "input_points" not in batch
        for row, image_id in enumerate(batch["image_id"].tolist()):
            index = [i.image_id for i in source.images].index(image_id)
            union = source[index]["masks"].any(axis=0) if source.images[index].instances else None
            if union is None:
                assert not batch["original_masks"][row].any()
            else:
                np.testing.assert_array_equal(batch["original_masks"][row][0].numpy(), union)


@pytest.mark.parametrize("mode", ["box", "point", "box+point", "none"])
def test_batches_feed_the_model(source, processor, tiny_sam, mode):
    config = DataConfig(prompt=mode, num_negative_points=1, max_instances=3)
    dataset = SamPromptDataset(source, processor, config, train=True)
    batch = to_device(next(iter(make_loader(dataset, batch_size=2))), "cpu")  # normalised where the model runs
    inputs = {k: batch[k] for k in ("pixel_values", "input_boxes", "input_points", "input_labels") if k in batch}
    with torch.no_grad():
        out = tiny_sam(**inputs, multimask_output=False)
    b, k = batch["valid"].shape
    assert out.pred_masks.shape == (b, k, 1, *batch["low_res_masks"].shape[-2:])
    assert torch.isfinite(out.pred_masks).all()
    masks = processor.post_process_masks(out.pred_masks, batch["original_sizes"], batch["reshaped_input_sizes"])
    for row in range(b):
        assert tuple(masks[row].shape[-2:]) == tuple(batch["original_sizes"][row].tolist())
