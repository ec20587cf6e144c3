"""Encoding one sample with the model's processor, and batching a variable number of instances."""

from __future__ import annotations

import numpy as np
import torch

from samtune.prompts import PAD_LABEL

# Per-instance fields padded along the instance axis, and the value padding takes.
INSTANCE_FIELDS = {
    "input_boxes": 0.0,
    "input_points": 0.0,
    "input_labels": PAD_LABEL,
    "labels": False,
    "category_ids": -1,
    "annotation_ids": -1,
}
# Fields of different shapes per image: kept as lists.
LIST_FIELDS = ("masks", "ignore_full")


def encode_sample(processor, image: np.ndarray, masks: np.ndarray, ignore: np.ndarray, prompts: dict) -> dict:
    """Run ``processor`` on one image, its K masks (low-res labels), its ignore map and K prompts."""
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
    encoded = {
        "pixel_values": out["pixel_values"][0],
        "original_sizes": out["original_sizes"][0],
        "reshaped_input_sizes": out["reshaped_input_sizes"][0],
        "labels": labels[:count],
        "ignore": labels[count],
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


def _pad(tensors: list[torch.Tensor], length: int, value: float | int | bool) -> torch.Tensor:
    first = tensors[0]
    out = torch.full((len(tensors), length, *first.shape[1:]), value, dtype=first.dtype)
    for row, tensor in enumerate(tensors):
        out[row, : len(tensor)] = tensor
    return out


def collate(samples: list[dict]) -> dict:
    """Stack a batch; pad instances to the largest count; ``valid`` (B, K) marks the real ones."""
    counts = [len(sample["labels"]) for sample in samples]
    longest = max(counts)
    batch: dict = {"valid": torch.arange(longest)[None, :] < torch.tensor(counts)[:, None]}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if key in INSTANCE_FIELDS:
            batch[key] = _pad(values, longest, INSTANCE_FIELDS[key])
        elif key in LIST_FIELDS:
            batch[key] = values
        else:
            batch[key] = torch.stack(values)
    return batch
