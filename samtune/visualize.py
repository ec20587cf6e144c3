"""Side-by-side overlays (ground truth | prediction) of evaluation samples, for TensorBoard."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from samtune.data.batch import SamBatch

PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    dtype=np.float32,
)


def paint(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    out = image.astype(np.float32).copy()
    for k, mask in enumerate(masks):
        colour = PALETTE[k % len(PALETTE)]
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out.clip(0, 255).astype(np.uint8)


def overlay_panel(batch: SamBatch, row: int, logits: torch.Tensor, processor) -> np.ndarray:
    """(H, 2W + 4, 3) uint8 at the model's input scale: the image with its ground truth, then with the prediction."""
    height, width = (int(v) for v in batch["reshaped_input_sizes"][row])
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    pixels = batch["pixel_values"][row].float().cpu() * std + mean
    image = (pixels[:, :height, :width].permute(1, 2, 0).numpy() * 255).clip(0, 255)
    count = int(batch["valid"][row].sum())
    truth = (
        F.interpolate(batch["original_masks"][row][None].float().cpu(), size=(height, width), mode="nearest")[0] > 0.5
    )
    side = batch["pixel_values"].shape[-1]  # the padded (SAM) or square (SAM 2 / 3) input side
    predicted = F.interpolate(logits[row, :count][None].float().cpu(), size=(side, side), mode="bilinear")[0]
    predicted = predicted[:, :height, :width] > 0
    gap = np.full((height, 4, 3), 255, np.uint8)
    return np.concatenate([paint(image, truth.numpy()), gap, paint(image, predicted.numpy())], axis=1)
