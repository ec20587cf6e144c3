"""samtune's torch twin of transformers' Sam2ImageProcessor / Sam3ImageProcessor (which need torchvision).

The reference values are computed here from torch ops and the torchvision resize rules; where the official class
imports (a working torchvision), ``test_equal_to_the_official_processor`` compares the two directly.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Sam2Processor, Sam3TrackerProcessor

from samtune.models import square_processor as sq
from samtune.models.square_processor import (
    SquareImageProcessor,
    load_square_processor,
    official_processor_available,
    square_processor,
)

FAMILY = {
    "sam2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1024, 256, Sam2Processor, "Sam2ImageProcessor"),
    "sam3_tracker": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1008, 288, Sam3TrackerProcessor, "Sam3ImageProcessor"),
}
SAVED_KEYS = {
    "do_convert_rgb",
    "do_normalize",
    "do_rescale",
    "do_resize",
    "image_mean",
    "image_processor_type",
    "image_std",
    "mask_size",
    "resample",
    "rescale_factor",
    "size",
}


def noise(height: int, width: int, seed: int = 0, channels: int | None = 3) -> np.ndarray:
    """Per-pixel noise: a resize without antialiasing, or with another kernel, lands far from the reference."""
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def ours(model_type: str, size: int, mask_size: int):
    """The family's processor around SquareImageProcessor, whether or not the official one imports here."""
    _, _, _, _, processor_class, official = FAMILY[model_type]
    settings = {"size": {"height": size, "width": size}, "mask_size": {"height": mask_size, "width": mask_size}}
    return processor_class(image_processor=SquareImageProcessor(image_processor_type=official, **settings))


def reference_pixels(image: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """What torchvision's tensor resize gives (antialiased bilinear; uint8 in, uint8 out: on CPUs with AVX2 /
    AVX-512 / ARM torch's own uint8 kernel, elsewhere float32 then round), then x / 255, then (x - mean) / std."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    native = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    if native:
        levels = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
    else:
        levels = F.interpolate(x.float(), (size, size), mode="bilinear", align_corners=False, antialias=True).round()
    return (levels.double() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize("model_type", FAMILY)
@pytest.mark.parametrize(("height", "width", "size"), [(37, 53, 32), (37, 53, 80), (90, 41, 64)])
def test_pixel_values_match_the_torchvision_reference(model_type, height, width, size):
    mean, std, *_ = FAMILY[model_type]
    processor = ours(model_type, size, size // 4)
    image = noise(height, width)
    out = processor(images=image, return_tensors="pt")
    pixels = out["pixel_values"]
    assert pixels.shape == (1, 3, size, size) and pixels.dtype == torch.float32
    assert out["original_sizes"].tolist() == [[height, width]]
    # the fused (x - 255 mean) / (255 std) in float32 differs from the float64 reference by float32 rounding only
    assert (pixels[0].double() - reference_pixels(image, size, mean, std)).abs().max() < 1e-5
    # resized values are whole uint8 levels (one level is ~0.017 after normalising: 1000x the tolerance above)
    levels = (pixels[0].double() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) * 255
    assert (levels - levels.round()).abs().max() < 1e-3


def test_family_defaults():
    for model_type, (mean, std, size, mask_size, processor_class, official) in FAMILY.items():
        image_processor = SquareImageProcessor(image_processor_type=official)
        assert tuple(image_processor.image_mean) == mean and tuple(image_processor.image_std) == std
        assert (image_processor.size.height, image_processor.mask_size.height) == (size, mask_size)
        processor = square_processor(model_type, size, mask_size)
        assert isinstance(processor, processor_class) and processor.target_size == size
        assert tuple(processor.image_processor.image_mean) == mean


def test_images_as_pil_lists_and_grey():
    processor = ours("sam2", 32, 8)
    image = noise(20, 30)
    one = processor(images=image, return_tensors="pt")["pixel_values"]
    pil = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
    assert torch.equal(one, pil)
    out = processor(images=[image, noise(40, 10, seed=1)], return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 32, 32) and out["original_sizes"].tolist() == [[20, 30], [40, 10]]
    assert torch.equal(out["pixel_values"][:1], one)
    read_only = noise(20, 30)
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable arrays: no such warning reaches users
        assert torch.equal(processor(images=read_only, return_tensors="pt")["pixel_values"], one)
    grey = noise(20, 30, channels=1)  # (H, W, 1): a bare (H, W) array is refused, as by the official one
    as_rgb = processor(images=np.repeat(grey, 3, axis=2), return_tensors="pt")["pixel_values"]
    assert torch.equal(processor(images=grey, return_tensors="pt")["pixel_values"], as_rgb)


def test_labels_are_nearest_exact_resized_int64():
    """transformers maps NEAREST to torchvision's NEAREST_EXACT (pixel centres), not torch's plain 'nearest'."""
    processor = ours("sam2", 64, 16)
    columns = np.tile(np.arange(50, dtype=np.uint8), (30, 1))  # each column its own value
    maps = [columns, (columns % 3 == 0).astype(np.uint8)]
    labels = processor(images=noise(30, 50), segmentation_maps=maps, return_tensors="pt")["labels"]
    assert labels.shape == (2, 16, 16) and labels.dtype == torch.int64
    x = torch.from_numpy(np.stack(maps))[:, None]
    exact = F.interpolate(x, (16, 16), mode="nearest-exact")[:, 0].long()
    assert torch.equal(labels, exact)
    assert not torch.equal(labels, F.interpolate(x, (16, 16), mode="nearest")[:, 0].long())
    one = processor(images=noise(30, 50), segmentation_maps=maps[1], return_tensors="pt")["labels"]
    assert torch.equal(one, exact[1:])  # a single map keeps its leading axis, as the official squeeze(1) does


def test_post_process_masks_upsamples_bilinear_and_thresholds_at_zero():
    processor = ours("sam2", 32, 8)
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[20, 30], [13, 7]])
    masks = processor.post_process_masks([logits, logits[:1]], sizes)
    assert [m.shape for m in masks] == [(2, 3, 20, 30), (1, 3, 13, 7)] and masks[0].dtype == torch.bool
    up = F.interpolate(logits, (20, 30), mode="bilinear", align_corners=False)
    assert torch.equal(masks[0], up > 0)
    assert torch.equal(processor.post_process_masks([logits], [[20, 30]], mask_threshold=0.5)[0], up > 0.5)
    assert torch.equal(processor.post_process_masks([logits], [[20, 30]], binarize=False)[0], up)


def test_prompts_are_scaled_per_axis():
    processor = ours("sam2", 64, 16)
    out = processor(
        images=noise(30, 50),
        input_boxes=[[[5.0, 3.0, 45.0, 27.0]]],
        input_points=[[[[10.0, 15.0]], [[-10.0, -10.0]]]],
        input_labels=[[[1], [1]]],
        return_tensors="pt",
    )
    sx, sy = 64 / 50, 64 / 30  # x by width, y by height: a fixed square, no aspect-preserving scale
    assert torch.allclose(out["input_boxes"], torch.tensor([[[5 * sx, 3 * sy, 45 * sx, 27 * sy]]]))
    assert torch.allclose(out["input_points"], torch.tensor([[[[10 * sx, 15 * sy]], [[-10.0, -10.0]]]]))


@pytest.mark.parametrize("model_type", FAMILY)
def test_saved_folder_loads_back_with_the_official_type(tmp_path, model_type):
    mean, std, _, _, processor_class, official = FAMILY[model_type]
    processor = square_processor(model_type, 48, 12, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_processor"]["image_processor_type"] == official
    assert set(saved["image_processor"]) == SAVED_KEYS
    assert saved["target_size"] == 48 and saved["processor_class"] == processor_class.__name__
    loaded = load_square_processor(str(tmp_path), model_type)
    assert isinstance(loaded, processor_class) and loaded.target_size == 48
    assert tuple(loaded.image_processor.image_mean) == (0.1, 0.2, 0.3)
    image, maps = noise(30, 50), [noise(30, 50, channels=None) % 2]
    first = processor(images=image, segmentation_maps=maps, input_boxes=[[[1, 2, 3, 4]]], return_tensors="pt")
    again = loaded(images=image, segmentation_maps=maps, input_boxes=[[[1, 2, 3, 4]]], return_tensors="pt")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_older_layout_preprocessor_config(tmp_path):
    """A folder with the image processor in preprocessor_config.json and the processor's own settings apart."""
    settings = {"image_processor_type": "Sam2ImageProcessorFast", "processor_class": "Sam2Processor"}
    settings |= {"size": {"height": 40, "width": 40}}
    settings |= {"mask_size": {"height": 10, "width": 10}, "resample": 3, "image_mean": [0.5] * 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    (tmp_path / "processor_config.json").write_text(json.dumps({"target_size": 40, "point_pad_value": -7}))
    processor = load_square_processor(str(tmp_path), "sam2")
    assert processor.point_pad_value == -7 and processor.target_size == 40
    image_processor = processor.image_processor
    assert image_processor.resample == 3 and tuple(image_processor.image_std) == (0.229, 0.224, 0.225)
    assert image_processor.to_dict()["image_processor_type"] == "Sam2ImageProcessor"
    assert processor(images=noise(30, 50), return_tensors="pt")["pixel_values"].shape == (1, 3, 40, 40)


def test_which_processor_is_said_once_at_info_with_no_warnings(tmp_path, caplog, monkeypatch):
    square_processor("sam2", 32, 8).save_pretrained(tmp_path)
    monkeypatch.setattr(sq, "_reported", set())
    with caplog.at_level(logging.INFO, logger="samtune"), warnings.catch_warnings():
        warnings.simplefilter("error")
        load_square_processor(str(tmp_path), "sam2")
        load_square_processor(str(tmp_path), "sam2")
    lines = [r.getMessage() for r in caplog.records if r.name == sq.__name__]
    assert len(lines) == 1 and "Sam2ImageProcessor" in lines[0]
    assert ("samtune's torch implementation" in lines[0]) != official_processor_available("sam2")


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="sam2"):
        square_processor("sam", 32, 8)


def _official_or_skip(model_type: str):
    """transformers' class, or a skip: its module imports torchvision, which fails to import with some torch
    builds (RuntimeError, not ImportError), so any exception counts as 'not here'."""
    try:
        if model_type == "sam2":
            from transformers.models.sam2.image_processing_sam2 import Sam2ImageProcessor as Official
        else:
            from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor as Official
    except Exception as error:
        if os.environ.get("SAMTUNE_REQUIRE_OFFICIAL_PROCESSOR"):  # launch/check_official_processor.sh: no skips
            raise
        pytest.skip(f"the official image processor needs a working torchvision: {type(error).__name__}: {error}")
    return Official


EQUALITY_CASES = [
    # (height, width, size, mask size, image kind, resample)
    (37, 53, 32, 8, "rgb", 2),  # downscale both sides
    (37, 53, 80, 20, "rgb", 2),  # upscale both sides
    (90, 41, 64, 16, "rgb", 2),  # down one side, up the other
    (300, 500, None, None, "rgb", 2),  # family default size (1024 / 1008)
    (45, 60, 48, 12, "grey", 2),
    (45, 60, 48, 12, "rgba", 2),
    (45, 60, 48, 12, "pil", 2),
    (37, 53, 64, 16, "rgb", 3),  # bicubic
    (37, 53, 32, 8, "pad", 2),  # do_pad to a larger pad_size (images and maps)
]


@pytest.mark.parametrize("model_type", FAMILY)
@pytest.mark.parametrize(("height", "width", "size", "mask_size", "kind", "resample"), EQUALITY_CASES)
def test_equal_to_the_official_processor(model_type, height, width, size, mask_size, kind, resample):
    """Tolerance: max |difference| <= 1e-6 on pixel_values (measured 0.0), labels and masks exactly equal."""
    Official = _official_or_skip(model_type)
    official_name = FAMILY[model_type][5]
    settings = {"resample": resample}
    if size is not None:
        settings |= {"size": {"height": size, "width": size}, "mask_size": {"height": mask_size, "width": mask_size}}
    if kind == "pad":
        settings |= {"do_pad": True, "pad_size": {"height": 40, "width": 44}}
    ours, theirs = SquareImageProcessor(image_processor_type=official_name, **settings), Official(**settings)
    assert ours.to_dict() == theirs.to_dict()
    image = {
        "rgb": noise(height, width),
        "pad": noise(height, width),
        "grey": noise(height, width, channels=1),
        "rgba": noise(height, width, channels=4),
        "pil": Image.fromarray(noise(height, width, channels=4), "RGBA"),
    }[kind]
    maps = [noise(height, width, seed=2, channels=None) % 5, noise(height, width, seed=3, channels=None)]
    a = ours(image, segmentation_maps=maps, return_tensors="pt")
    b = theirs(image, segmentation_maps=maps, return_tensors="pt")
    assert a.keys() == b.keys()
    difference = (a["pixel_values"] - b["pixel_values"]).abs().max().item()
    print(f"{model_type} {height}x{width}->{size} {kind} resample={resample}: max |diff| {difference}")
    assert a["pixel_values"].shape == b["pixel_values"].shape and difference <= 1e-6
    assert torch.equal(a["labels"], b["labels"]) and a["labels"].dtype == b["labels"].dtype
    assert torch.equal(a["original_sizes"], b["original_sizes"])
    logits = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for kwargs in ({}, {"mask_threshold": 0.3}, {"binarize": False}):
        assert torch.equal(
            ours.post_process_masks([logits], a["original_sizes"], **kwargs)[0],
            theirs.post_process_masks([logits], b["original_sizes"], **kwargs)[0],
        )


@pytest.mark.parametrize("model_type", FAMILY)
def test_folders_cross_load_between_the_official_and_the_torch_processor(tmp_path, model_type, monkeypatch):
    """A folder saved around SquareImageProcessor loads with the official AutoProcessor, and an official folder
    loads with the torch processor, with the same outputs both ways."""
    Official = _official_or_skip(model_type)
    from transformers import AutoProcessor

    _, _, _, _, processor_class, official_name = FAMILY[model_type]
    settings = {"size": {"height": 40, "width": 40}, "mask_size": {"height": 10, "width": 10}}
    ours = processor_class(image_processor=SquareImageProcessor(image_processor_type=official_name, **settings))
    theirs = processor_class(image_processor=Official(**settings), point_pad_value=-3)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    monkeypatch.setattr(sq, "official_processor_available", lambda model_type: False)
    loaded_theirs = load_square_processor(str(tmp_path / "theirs"), model_type)
    loaded_ours = AutoProcessor.from_pretrained(tmp_path / "ours")
    assert type(loaded_ours.image_processor) is Official and type(loaded_theirs.image_processor) is SquareImageProcessor
    assert loaded_theirs.point_pad_value == -3
    image, maps = noise(30, 50), [noise(30, 50, channels=None) % 2]
    for a, b in ((ours, loaded_ours), (theirs, loaded_theirs)):
        x = a(images=image, segmentation_maps=maps, input_boxes=[[[1, 2, 3, 4]]], return_tensors="pt")
        y = b(images=image, segmentation_maps=maps, input_boxes=[[[1, 2, 3, 4]]], return_tensors="pt")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("model_type", [*FAMILY, "sam"])
def test_the_uint8_path_reproduces_the_official_processors(model_type):
    """samtune.data.geometry (uint8 resize on the CPU, normalisation on the device) against transformers'
    torchvision processors: SAM 2 / 3's, and SAM's own torchvision class (which a machine with torchvision loads
    instead of the PIL one the suite uses). Pixels within float rounding; targets, sizes, prompts exactly."""
    from samtune.data.geometry import InputGeometry, normalize_on_device

    if model_type == "sam":
        try:
            from transformers.models.sam.image_processing_sam import SamImageProcessor as Official
        except Exception as error:
            if os.environ.get("SAMTUNE_REQUIRE_OFFICIAL_PROCESSOR"):
                raise
            pytest.skip(f"the torchvision SAM image processor needs a working torchvision: {error}")
        from transformers import SamProcessor

        settings = {"size": {"longest_edge": 64}, "pad_size": {"height": 64, "width": 64},
                    "mask_size": {"longest_edge": 16}, "mask_pad_size": {"height": 16, "width": 16}}  # fmt: skip
        processor = SamProcessor(image_processor=Official(**settings))
    else:
        Official = _official_or_skip(model_type)
        settings = {"size": {"height": 64, "width": 64}, "mask_size": {"height": 16, "width": 16}}
        processor = FAMILY[model_type][4](image_processor=Official(**settings))
    geometry = InputGeometry.of(processor)
    assert geometry.pil is False  # the torch kernels torchvision runs
    for height, width in [(37, 53), (90, 41), (129, 517)]:
        image = noise(height, width)
        maps = np.stack([noise(height, width, seed=seed, channels=None) % 2 for seed in (2, 3)])
        boxes = np.array([[1.5, 2.0, 30.25, 20.0]], dtype=np.float32)
        expected = processor(images=image, segmentation_maps=list(maps.astype(np.uint8)), input_boxes=[boxes.tolist()],
                             return_tensors="pt")  # fmt: skip
        pixels, resized = geometry.image(image)
        mean, std = geometry.statistics()
        batch = {"pixel_values": pixels[None], "pixel_mean": mean[None], "pixel_std": std[None],
                 "reshaped_input_sizes": resized[None]}  # fmt: skip
        normalised = normalize_on_device(batch)["pixel_values"]
        assert (normalised - expected["pixel_values"]).abs().max() <= 2e-6
        targets = geometry.targets(maps.astype(bool))
        assert targets.shape == (2, 16, 16) and torch.equal(targets, expected["labels"].bool().reshape(2, 16, 16))
        scaled = geometry.coordinates(boxes.reshape(-1, 2, 2), height, width).reshape(-1, 4)
        assert torch.equal(scaled, expected["input_boxes"][0].float())
        if "reshaped_input_sizes" in expected:
            assert torch.equal(resized, expected["reshaped_input_sizes"][0].long())
