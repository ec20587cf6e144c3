"""The batch every model call, loss and metric reads: its keys, shapes and meaning, and how one is built.

``encode_sample`` runs the model's processor on one image, its K instance masks and K prompts; ``collate``
stacks B samples and pads the instance axis to the largest K, with ``valid`` marking the real instances.
Padded instances are never scored and never reach the loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypedDict

import numpy as np
import torch
from PIL import Image

from samtune.data.geometry import InputGeometry, normalize_on_device
from samtune.data.prompts import PAD_LABEL

# Prompt keys, named as the model's forward takes them.
PROMPT_KEYS = ("input_boxes", "input_points", "input_labels")


class _SamBatchAlways(TypedDict):
    """B images, up to K instances each (S: the model's input side, h = w: its low-resolution mask side).

    Coordinates of prompts are in the processor's resized frame (what the model takes), not the original image's.
    """

    image_id: torch.Tensor  # (B,) int64: COCO image ids (unique within a split)
    pixel_values: torch.Tensor  # (B, 3, S, S) float: resized, normalised, padded images (uint8, not yet normalised,
    # between the loader and normalize_on_device: samtune.data.geometry)
    original_sizes: torch.Tensor  # (B, 2) int64: (H, W) of each image as annotated (upright)
    reshaped_input_sizes: torch.Tensor  # (B, 2) int64: (h', w') of the resized image inside the padded S x S
    # (S, S) for the families that resize to a fixed square (SAM 2 / 3)
    valid: torch.Tensor  # (B, K) bool: real instances; the rest is padding
    low_res_masks: torch.Tensor  # (B, K, h, w) bool: training targets at the model's mask resolution
    low_res_ignore: torch.Tensor  # (B, h, w) bool: crowd pixels at mask resolution (no loss there)
    category_ids: torch.Tensor  # (B, K) int64: COCO category ids, -1 for padding (and in prompt mode none)
    annotation_ids: torch.Tensor  # (B, K) int64: COCO annotation ids, -1 for padding (and in prompt mode none)


class SamBatch(_SamBatchAlways, total=False):
    """A batch: the keys above always, these by prompt mode and split."""

    input_boxes: torch.Tensor  # (B, K, 4) float: XYXY box per instance (box prompt modes)
    input_points: torch.Tensor  # (B, K, P, 2) float: (x, y) points per instance (point modes)
    input_labels: torch.Tensor  # (B, K, P) int64: 1 positive, 0 negative, PAD_LABEL padding
    original_masks: list[torch.Tensor]  # B x (K_b, H_b, W_b) bool: evaluation targets at the original size
    original_ignore: list[torch.Tensor]  # B x (H_b, W_b) bool: crowd pixels at the original size (evaluation)
    # The uint8 path, until normalize_on_device consumes the first two:
    pixel_mean: torch.Tensor  # (B, 3) float: per-channel mean in 0-255 units
    pixel_std: torch.Tensor  # (B, 3) float: per-channel std in 0-255 units
    has_pixels: torch.Tensor  # (B,) bool: False where the image was not read (its embedding is cached)
    dropped: torch.Tensor  # (B,) int64, training: instances a crop or augmentation cut away (samtune.data.augment)


# Per-instance fields padded along the instance axis, and the value padding takes.
INSTANCE_FIELDS = {
    "input_boxes": 0.0,
    "input_points": 0.0,
    "input_labels": PAD_LABEL,
    "low_res_masks": False,
    "category_ids": -1,
    "annotation_ids": -1,
}
# Fields whose shape differs per image (the original size): kept as lists.
LIST_FIELDS = ("original_masks", "original_ignore")


def encode_sample(processor, image: np.ndarray, masks: np.ndarray, ignore: np.ndarray, prompts: dict) -> dict:
    """Run ``processor`` on one image, its K masks (low-res targets), its ignore map and K prompts: one sample of a
    ``SamBatch`` without the batch axis (and without ids, added by the data set)."""
    count = len(masks)
    maps = [m.astype(np.uint8) for m in masks] + [ignore.astype(np.uint8)]
    kwargs = {}
    if "boxes" in prompts and count:
        kwargs["input_boxes"] = [prompts["boxes"].tolist()]
    if "points" in prompts and count:
        kwargs["input_points"] = [prompts["points"].tolist()]
        kwargs["input_labels"] = [prompts["point_labels"].tolist()]
    out = processor(images=image, segmentation_maps=maps, return_tensors="pt", **kwargs)
    labels = out["labels"].bool()
    pixel_values = out["pixel_values"][0]
    resized = out["reshaped_input_sizes"][0] if "reshaped_input_sizes" in out else torch.tensor(pixel_values.shape[-2:])
    encoded = {
        "pixel_values": pixel_values,
        "original_sizes": torch.as_tensor(out["original_sizes"][0]).long(),
        "reshaped_input_sizes": resized.long(),
        "low_res_masks": labels[:count],
        "low_res_ignore": labels[count],
    }
    if "boxes" in prompts:
        encoded["input_boxes"] = out["input_boxes"][0].float() if count else torch.zeros(0, 4)
    if "points" in prompts:
        points_per_instance = prompts["points"].shape[1]
        if count:
            encoded["input_points"] = out["input_points"][0].float()
            encoded["input_labels"] = out["input_labels"][0].long()
        else:
            encoded["input_points"] = torch.zeros(0, points_per_instance, 2)
            encoded["input_labels"] = torch.zeros(0, points_per_instance, dtype=torch.long)
    return encoded


def encode_uint8(
    geometry: InputGeometry,
    image: np.ndarray | Image.Image | None,
    size: tuple[int, int],
    masks: np.ndarray,
    ignore: np.ndarray,
    prompts: dict,
) -> dict:
    """``encode_sample``'s sample with the image resized in uint8 and left for the device to normalise; ``image``
    None (its embedding is cached): no pixels, targets and prompts from the annotations and ``size`` (H, W)."""
    height, width = size
    if image is None:
        pixel_values = torch.zeros((), dtype=torch.uint8).expand(3, geometry.side, geometry.side)
        resized = torch.tensor(geometry.resized(height, width))
    else:
        pixel_values, resized = geometry.image(image)
    maps = geometry.targets(np.concatenate([masks, ignore[None]]))
    mean, std = geometry.statistics()
    encoded = {
        "pixel_values": pixel_values,
        "original_sizes": torch.tensor([height, width]),
        "reshaped_input_sizes": resized.long(),
        "low_res_masks": maps[:-1],
        "low_res_ignore": maps[-1],
        "pixel_mean": mean,
        "pixel_std": std,
        "has_pixels": torch.tensor(image is not None),
    }
    if "boxes" in prompts:
        boxes = geometry.coordinates(prompts["boxes"].reshape(-1, 2, 2), height, width)
        encoded["input_boxes"] = boxes.reshape(-1, 4)
    if "points" in prompts:
        encoded["input_points"] = geometry.coordinates(prompts["points"], height, width)
        encoded["input_labels"] = torch.from_numpy(prompts["point_labels"]).long()
    return encoded


def _pad(tensors: list[torch.Tensor], length: int, value: float | int | bool) -> torch.Tensor:
    first = tensors[0]
    out = torch.full((len(tensors), length, *first.shape[1:]), value, dtype=first.dtype)
    for row, tensor in enumerate(tensors):
        out[row, : len(tensor)] = tensor
    return out


def collate(samples: list[dict]) -> SamBatch:
    """Stack a batch; pad instances to the largest count; ``valid`` (B, K) marks the real ones."""
    counts = [len(sample["low_res_masks"]) for sample in samples]
    longest = max(counts)
    batch: dict = {"valid": torch.arange(longest)[None, :] < torch.tensor(counts)[:, None]}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if key in INSTANCE_FIELDS:
            batch[key] = _pad(values, longest, INSTANCE_FIELDS[key])
        elif key in LIST_FIELDS:
            batch[key] = values
        elif key == "pixel_values" and "has_pixels" in samples[0] and not any(s["has_pixels"] for s in samples):
            batch[key] = values[0].expand(len(values), *values[0].shape)  # no pixels read: nothing to stack
        else:
            batch[key] = torch.stack(values)
    return batch  # type: ignore[return-value]


def prompts_of(batch: SamBatch) -> dict[str, torch.Tensor]:
    """The prompt tensors of a batch, keyed as the model's forward takes them."""
    return {key: batch[key] for key in PROMPT_KEYS if key in batch}


def uses_multimask(batch: SamBatch) -> bool:
    """Point prompts alone are ambiguous: SAM then predicts three masks (whole, part, sub-part)."""
    return "input_points" in batch and "input_boxes" not in batch


def to_device(batch: SamBatch, device: torch.device | str) -> SamBatch:
    """The batch's tensors on ``device``, its images normalised there (``normalize_on_device``); the full-size
    evaluation masks stay where they are (they are scored on the CPU)."""
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    return normalize_on_device(moved)  # type: ignore[return-value]


class NormalizedBatches:
    """A loader whose batches (already on the device, as accelerate's loaders deliver them) come out normalised."""

    def __init__(self, loader: Iterable[SamBatch]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[SamBatch]:
        return (normalize_on_device(batch) for batch in self.loader)  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]
