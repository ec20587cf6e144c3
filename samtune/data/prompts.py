"""One prompt per instance: boxes and points drawn from its mask.

Coordinates follow SAM's convention: (x, y) pixel indices in the original image,
boxes XYXY with inclusive corners (the first and last pixel of the mask in each
direction), which the prompt encoder shifts to pixel centres itself.
Training samples with a random generator; evaluation passes ``rng=None`` and gets
fixed prompts: the tight box, and the interior point farthest from the boundary.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt

from samtune.config import MIXED_KINDS, DataConfig

PAD_LABEL = -10  # SAM's prompt encoder ignores points with this label


def uses_boxes(mode: str) -> bool:
    return "box" in mode or mode == "mixed"


def uses_points(mode: str) -> bool:
    return "point" in mode or mode == "mixed"


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Inclusive XYXY box of a non-empty boolean mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def jitter_box(box: np.ndarray, fraction: float, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Move each side by up to ``fraction`` of the box's size, clipped to the image, never inverted."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    shift = rng.uniform(-fraction, fraction, size=4) * np.array([w, h, w, h])
    x0, y0, x1, y1 = box + shift
    x0, x1 = np.clip([x0, x1], 0, width - 1)
    y0, y1 = np.clip([y0, y1], 0, height - 1)
    return np.array([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], dtype=np.float32)


def farthest_interior_point(mask: np.ndarray) -> np.ndarray:
    """The mask pixel farthest from the mask's boundary (the image border counts as boundary).

    Ties (a strip, a rectangle) go to the tied pixel nearest their centroid, so the point is central.
    """
    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    tied = np.argwhere(distance == distance.max())
    row, col = tied[np.argmin(((tied - tied.mean(axis=0)) ** 2).sum(axis=1))]
    return np.array([col, row], dtype=np.float32)


def sample_points(
    mask: np.ndarray, box: np.ndarray, positives: int, negatives: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random positives in the mask and negatives in the box outside it; missing negatives are padding."""
    ys, xs = np.nonzero(mask)
    pick = rng.choice(len(xs), size=positives, replace=len(xs) < positives)
    points = [np.stack([xs[pick], ys[pick]], axis=1)]
    labels = [np.ones(positives, dtype=np.int64)]
    if negatives:
        x0, y0, x1, y1 = box.astype(int)
        outside = ~mask[y0 : y1 + 1, x0 : x1 + 1]
        ny, nx = np.nonzero(outside)
        found = min(negatives, len(nx))
        chosen = rng.choice(len(nx), size=found, replace=False) if found else np.zeros(0, dtype=int)
        negative_points = np.zeros((negatives, 2))
        negative_points[:found] = np.stack([nx[chosen] + x0, ny[chosen] + y0], axis=1)
        negative_labels = np.full(negatives, PAD_LABEL, dtype=np.int64)
        negative_labels[:found] = 0
        points.append(negative_points)
        labels.append(negative_labels)
    return np.concatenate(points).astype(np.float32), np.concatenate(labels)


def make_prompts(masks: np.ndarray, data: DataConfig, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Prompts for K non-empty masks (K, H, W): ``boxes`` (K, 4) and/or ``points`` (K, P, 2) + ``point_labels`` (K, P).

    The prompt settings are ``data``'s (prompt, box_jitter, num_points, num_negative_points).
    ``rng=None`` means evaluation: no jitter, one fixed positive point, no negatives; "mixed" evaluates with boxes.
    """
    prompts: dict[str, np.ndarray] = {}
    mode = "box" if data.prompt == "mixed" and rng is None else data.prompt
    if mode == "none":
        return prompts
    height, width = masks.shape[1:]
    if len(masks) == 0:
        if uses_boxes(mode):
            prompts["boxes"] = np.zeros((0, 4), np.float32)
        if uses_points(mode):
            count = 1 if rng is None else data.num_points + data.num_negative_points
            prompts["points"] = np.zeros((0, count, 2), np.float32)
            prompts["point_labels"] = np.zeros((0, count), np.int64)
        return prompts
    tight = [box_from_mask(mask) for mask in masks]
    if uses_boxes(mode):
        boxes = tight if rng is None else [jitter_box(b, data.box_jitter, rng, height, width) for b in tight]
        prompts["boxes"] = np.stack(boxes).reshape(-1, 4).astype(np.float32)
    if uses_points(mode):
        if rng is None:
            points = np.stack([farthest_interior_point(mask)[None] for mask in masks])
            labels = np.ones(points.shape[:2], dtype=np.int64)
        else:
            sampled = [
                sample_points(mask, box, data.num_points, data.num_negative_points, rng)
                for mask, box in zip(masks, tight)
            ]
            points = np.stack([p for p, _ in sampled])
            labels = np.stack([lab for _, lab in sampled])
        prompts["points"] = points.astype(np.float32)
        prompts["point_labels"] = labels
    return prompts


def keep_prompt_kind(batch: dict, kind: str) -> dict:
    """The batch with only the prompts of ``kind`` (one of ``MIXED_KINDS``): a "mixed" training step's draw."""
    if kind not in MIXED_KINDS:
        raise ValueError(f"prompt kind must be one of {MIXED_KINDS}, got {kind!r}")
    drop = {"box": ("input_points", "input_labels"), "point": ("input_boxes",), "box+point": ()}[kind]
    return {key: value for key, value in batch.items() if key not in drop}
