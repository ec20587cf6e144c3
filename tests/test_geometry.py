"""The uint8 data path (samtune.data.geometry) against the processors it stands in for, family by family, and the
images the embedding cache makes unnecessary never read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from samtune.config import DataConfig
from samtune.data import coco
from samtune.data.batch import collate, encode_sample, encode_uint8, to_device
from samtune.data.coco import CocoInstanceDataset
from samtune.data.dataset import SamPromptDataset
from samtune.data.geometry import (
    InputGeometry,
    UnsupportedGeometry,
    normalize_on_device,
    zero_outside_by_mask,
    zero_outside_by_rows,
)
from samtune.data.prompts import make_prompts
from samtune.models.architectures import (
    processor_for,
    tiny_sam2_config,
    tiny_sam3_tracker_config,
    tiny_sam_config,
    tiny_sam_hq_config,
)
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco

PROCESSORS = {
    "sam": lambda: processor_for(tiny_sam_config(image_size=128)),
    "sam_hq": lambda: processor_for(tiny_sam_hq_config(image_size=128)),
    "sam2": lambda: processor_for(tiny_sam2_config(image_size=128)),
    "sam3_tracker": lambda: processor_for(tiny_sam3_tracker_config(image_size=112)),
    "sam 1024": lambda: processor_for(tiny_sam_config(image_size=1024, patch_size=64)),
}
# (height, width): upscaled, downscaled, portrait, landscape, odd sizes whose rounding differs per side
SIZES = [(37, 53), (300, 200), (129, 517), (97, 97), (640, 427)]


def _sample(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    masks = np.zeros((3, height, width), bool)
    for mask in masks:
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        mask[y : y + 1 + rng.integers(1, height // 2), x : x + 1 + rng.integers(1, width // 2)] = True
    ignore = np.zeros((height, width), bool)
    ignore[: height // 5, -width // 4 :] = True
    prompts = make_prompts(masks, DataConfig(prompt="box+point", num_points=2, num_negative_points=1), rng)
    return image, masks, ignore, prompts


@pytest.mark.parametrize("name", PROCESSORS)
def test_the_uint8_path_equals_the_processor(name):
    """Pixels within float rounding once normalised on the device, padding 0; sizes, targets, prompts exact."""
    processor = PROCESSORS[name]()
    geometry = InputGeometry.of(processor)
    for number, (height, width) in enumerate(SIZES):
        image, masks, ignore, prompts = _sample(height, width, number)
        expected = collate([encode_sample(processor, image, masks, ignore, prompts)])
        got = collate([encode_uint8(geometry, image, (height, width), masks, ignore, prompts)])
        assert got["pixel_values"].dtype == torch.uint8  # what crosses to the device: a byte a channel
        got = normalize_on_device(got)
        assert set(got) == set(expected) | {"has_pixels"}
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=2e-6)
        for key in expected:
            if key != "pixel_values":
                assert torch.equal(got[key], expected[key]), (name, (height, width), key)
                assert got[key].dtype == expected[key].dtype, key


def test_the_padding_is_zero_and_rows_without_pixels_stay_zero():
    processor = PROCESSORS["sam"]()
    geometry = InputGeometry.of(processor)
    image, masks, ignore, prompts = _sample(40, 100, 0)  # resized to 51 x 128: rows 51.. are padding
    read = encode_uint8(geometry, image, (40, 100), masks, ignore, prompts)
    unread = encode_uint8(geometry, None, (40, 100), masks, ignore, prompts)
    assert unread["pixel_values"].stride() == (0, 0, 0)  # no memory for an image not read
    for key in ("low_res_masks", "low_res_ignore", "input_boxes", "input_points", "reshaped_input_sizes"):
        assert torch.equal(read[key], unread[key]), key
    batch = normalize_on_device(collate([read, unread]))
    assert batch["has_pixels"].tolist() == [True, False]
    assert batch["pixel_values"][0, :, 51:].abs().max() == 0 and batch["pixel_values"][0, :, :51].abs().min() > 0
    assert batch["pixel_values"][1].abs().max() == 0
    alone = normalize_on_device(collate([unread, unread]))
    assert alone["pixel_values"].shape == (2, 3, 128, 128) and alone["pixel_values"].abs().max() == 0
    assert to_device(batch, "cpu")["pixel_values"] is batch["pixel_values"]  # a float batch passes unchanged


def test_both_ways_of_zeroing_the_padding_agree():
    """The accelerator's masked multiply (not run on this CPU otherwise) against the CPU's slicing."""
    values = torch.randn(3, 3, 16, 16)
    sizes, has = torch.tensor([[16, 9], [5, 16], [16, 16]]), torch.tensor([True, True, False])
    by_rows = zero_outside_by_rows(values.clone(), sizes, has)
    assert torch.equal(by_rows, zero_outside_by_mask(values.clone(), sizes, has))
    assert by_rows[0, :, :, 9:].abs().max() == 0 and by_rows[0, :, :, :9].abs().min() > 0
    assert by_rows[1, :, 5:].abs().max() == 0 and by_rows[2].abs().max() == 0
    every = zero_outside_by_rows(values.clone(), sizes, None)
    assert torch.equal(every, zero_outside_by_mask(values.clone(), sizes, None)) and every[2].abs().min() > 0


def test_settings_the_path_does_not_reproduce_fall_back_to_the_processor(tmp_path, caplog):
    processor = PROCESSORS["sam"]()
    processor.image_processor.resample = 0  # NEAREST: not reproduced
    with pytest.raises(UnsupportedGeometry, match="resample"):
        InputGeometry.of(processor)
    annotations, images = make_synthetic_coco(tmp_path / "c", SyntheticSpec(2, seed=3, max_side=64))
    with caplog.at_level("INFO"):
        dataset = SamPromptDataset(CocoInstanceDataset(annotations, images), processor, DataConfig())
    assert dataset.geometry is None and "normalised on the CPU by the processor" in caplog.text
    assert dataset[0]["pixel_values"].dtype == torch.float32


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple:
    """JPEG with EXIF rotation, 16-bit and palette PNGs, crowd regions."""
    return make_synthetic_coco(tmp_path_factory.mktemp("photos"), SyntheticSpec(num_images=5, seed=21, max_side=150))


@pytest.mark.parametrize("name", ["sam", "sam2"])
@pytest.mark.parametrize("train", [True, False])
def test_the_datasets_agree_sample_for_sample(name, train, photos):
    """The same data set on both paths: the same instances, prompts and targets, pixels to float rounding."""
    processor, source = PROCESSORS[name](), CocoInstanceDataset(*photos)
    config = {"prompt": "mixed" if train else "box+point", "max_instances": 2}
    on_cpu = SamPromptDataset(source, processor, DataConfig(normalize_on="cpu", **config), train=train, seed=4)
    on_device = SamPromptDataset(source, processor, DataConfig(normalize_on="device", **config), train=train, seed=4)
    assert len(on_cpu) == len(on_device) > 2
    for dataset in (on_cpu, on_device):
        dataset.set_epoch(1)
    expected = collate([on_cpu[i] for i in range(len(on_cpu))])
    got = to_device(collate([on_device[i] for i in range(len(on_device))]), "cpu")
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=2e-6)
    for key, value in expected.items():
        if key in ("original_masks", "original_ignore"):
            assert all(torch.equal(a, b) for a, b in zip(got[key], value)), key
        elif key != "pixel_values":
            assert torch.equal(got[key], value), key


def test_skipped_images_are_not_read(photos, monkeypatch):
    source = CocoInstanceDataset(*photos)
    dataset = SamPromptDataset(source, PROCESSORS["sam"](), DataConfig(max_instances=3), train=True, seed=1)
    read = [dataset[i] for i in range(len(dataset))]
    ids = [int(sample["image_id"]) for sample in read]
    dataset.skip_pixels(set(ids[:2]))
    opened = []
    for name in ("read_rgb", "read_rgb_image"):  # numpy or PIL: any decoding counts
        real = getattr(coco, name)
        monkeypatch.setattr(coco, name, lambda path, real=real: opened.append(path) or real(path))
    skipped = [dataset[i] for i in range(len(dataset))]
    assert len(opened) == len(ids) - 2  # the two cached images were never opened
    for before, after in zip(read, skipped):
        assert bool(after["has_pixels"]) == (int(after["image_id"]) not in ids[:2])
        for key in ("low_res_masks", "low_res_ignore", "input_boxes", "annotation_ids", "original_sizes"):
            assert torch.equal(before[key], after[key]), key  # annotations and prompts do not depend on pixels
    cpu = SamPromptDataset(source, PROCESSORS["sam"](), DataConfig(normalize_on="cpu"), train=True)
    cpu.skip_pixels(set(ids))  # the processor's path always reads
    assert cpu.cached == frozenset()


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("geometry-splits")
    return {
        "train": make_synthetic_coco(root / "train", SyntheticSpec(num_images=4, seed=31, max_side=120)),
        "val": make_synthetic_coco(root / "val", SyntheticSpec(num_images=3, seed=32, max_side=120)),
    }


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_training_is_the_same_on_both_data_paths(tmp_path, tiny_sam_dir, train_tiny, splits, family):
    """Losses step by step and the trained weights: the device path changes where images are normalised, not
    what the model learns (the encoder trains, so every step reads pixels)."""
    from safetensors.torch import load_file

    from samtune.testing.tiny import save_tiny

    model = tiny_sam_dir if family == "sam" else save_tiny(tmp_path / family, family, seed=1)
    runs = {}
    for where in ("cpu", "device"):
        out = tmp_path / where
        train_tiny(out, splits["train"], splits["val"], **{
            "model.name_or_path": str(model), "peft.method": "full", "data.normalize_on": where,
            "train.max_steps": 4, "train.batch_size": 2, "train.log_every": 1, "train.eval_every": 1,
            "data.prompt": "mixed",
        })  # fmt: skip
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curve = [(line["step"], line["train_loss"], line["mIoU"]) for line in lines if line["kind"] != "zero-shot"]
        runs[where] = (curve, out)
    (cpu_curve, cpu_out), (device_curve, device_out) = runs["cpu"], runs["device"]
    assert [step for step, _, _ in cpu_curve] == [1, 2, 3, 4]  # a loss and a val mIoU after every step
    for (step, loss, miou), (cpu_step, cpu_loss, cpu_miou) in zip(device_curve, cpu_curve, strict=True):
        assert step == cpu_step and loss == pytest.approx(cpu_loss, rel=1e-5)
        assert miou == pytest.approx(cpu_miou, abs=1e-5)
    # Weights: Adam divides by the gradient's own size, so entries whose gradient is ~0 (rounding noise on
    # either path) take lr-sized steps either way; the update as a whole agrees.
    start = load_file(Path(model) / "model.safetensors")
    a, b = load_file(cpu_out / "final" / "model.safetensors"), load_file(device_out / "final" / "model.safetensors")
    moved = torch.cat([(a[key] - start[key]).flatten() for key in a]).norm()
    apart = torch.cat([(a[key] - b[key]).flatten() for key in a]).norm()
    assert moved > 0.1 and apart < 0.01 * moved, (float(apart), float(moved))


def test_a_cached_epoch_reads_no_training_image(tmp_path, train_tiny, splits, monkeypatch):
    """Frozen encoder: the first epoch reads and caches every training image, later epochs read none of them."""
    opened: list = []
    for name in ("read_rgb", "read_rgb_image"):  # numpy or PIL: any decoding counts
        real = getattr(coco, name)
        monkeypatch.setattr(coco, name, lambda path, real=real: opened.append(Path(path)) or real(path))
    train_tiny(tmp_path / "run", splits["train"], splits["val"], **{
        "peft.method": "decoder", "train.max_steps": 0, "train.epochs": 3, "train.batch_size": 2,
    })  # fmt: skip
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(summary["epoch_seconds"]) == 3 and summary["embedding_cache"]["hits"] > 0
    used = [image.path for image in CocoInstanceDataset(*splits["train"]).images if image.instances]
    reads = [path for path in opened if path.is_relative_to(splits["train"][1])]
    assert sorted(reads) == sorted(used)  # each training image with instances once: in the first epoch
