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


def draw_points(image: np.ndarray, points: np.ndarray, radius: int) -> np.ndarray:
    """Dots on an (H, W, 3) image for (P, 3) x, y, label rows: green positive, red negative."""
    out = image.copy()
    rows, cols = np.ogrid[: out.shape[0], : out.shape[1]]
    for x, y, label in points:
        disc = (cols - x) ** 2 + (rows - y) ** 2 <= radius**2
        out[disc] = (0, 200, 0) if label > 0 else (220, 0, 0)
    return out


def overlay_panel(
    batch: SamBatch, row: int, logits: torch.Tensor, processor, points: np.ndarray | None = None
) -> np.ndarray:
    """(H, 2W + 4, 3) uint8 at the model's input scale: the image with its ground truth, then with the prediction
    and ``points`` ((P, 3) x, y in the model's input frame, label), e.g. the clicks that led to it."""
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
    shown = paint(image, predicted.numpy())
    if points is not None and len(points):
        shown = draw_points(shown, points, radius=max(1, round(max(height, width) / 100)))
    return np.concatenate([paint(image, truth.numpy()), gap, shown], axis=1)
