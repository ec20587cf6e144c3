"""Correction clicks: where an annotator clicks next, given the current mask and the truth.

The rule is RITM's and SAM's: the click goes into the error, far from the error's boundary, positive (label 1)
inside a false negative, negative (label 0) inside a false positive. Crowd pixels are not errors; the image
border counts as boundary.

- ``next_click``: evaluation and tools, at the original resolution, deterministic: of the two error regions
  the one reaching farther from its boundary (Euclidean), and in it the pixel farthest from that boundary.
- ``sample_clicks``: training, at the model's mask resolution, on the device, for N instances at once: the
  region is drawn with probability proportional to its area (SAM samples uniformly from the error), the click
  uniformly among its "core" pixels, those at least half the region's largest depth from its boundary (depth:
  3 x 3 erosions survived, a chessboard distance, cheap on a GPU).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from samtune.data.prompts import PAD_LABEL, farthest_interior_point


def next_click(
    pred: np.ndarray, target: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[np.ndarray, int] | None:
    """The next (x, y) click and its label (1 positive, 0 negative) for one instance; None when nothing is wrong.

    ``pred``, ``target``, ``ignore``: boolean (H, W) arrays. Ties between the regions go to the false negative.
    """
    keep = ~ignore if ignore is not None else np.ones_like(target, dtype=bool)
    missed, extra = target & ~pred & keep, pred & ~target & keep
    reach = [distance_transform_edt(np.pad(region, 1)).max() if region.any() else 0.0 for region in (missed, extra)]
    if max(reach) == 0:
        return None
    positive = reach[0] >= reach[1]
    return farthest_interior_point(missed if positive else extra), int(positive)


def depth(region: torch.Tensor) -> torch.Tensor:
    """(N, h, w) boolean regions -> int32 depth: 0 outside, 1 on the region's boundary, k after k - 1 erosions."""
    current = region[:, None].float()
    total = torch.zeros_like(current, dtype=torch.int32)
    for _ in range((min(region.shape[-2:]) + 1) // 2):
        if not bool(current.any()):
            break
        total += current.int()
        # 3 x 3 erosion; the zero border makes the image edge a boundary
        current = -F.max_pool2d(-F.pad(current, (1, 1, 1, 1)), 3, stride=1)
    return total[:, 0]


def sample_clicks(
    pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training click per instance: ``pred``, ``target``, ``keep`` (N, h, w) boolean at mask resolution.

    Returns (N, 2) (x, y) pixel indices of the mask grid and (N,) labels: 1 in a false negative, 0 in a false
    positive, ``PAD_LABEL`` (ignored by the prompt encoder) for an instance without error.
    """
    missed, extra = target & ~pred & keep, pred & ~target & keep
    areas = torch.stack([missed.flatten(1).sum(1), extra.flatten(1).sum(1)], dim=1).float()  # (N, 2)
    draw = torch.rand(len(pred), generator=generator, device=pred.device)
    positive = draw * areas.sum(1) < areas[:, 0]
    region = torch.where(positive[:, None, None], missed, extra)
    depths = depth(region)
    deepest = depths.flatten(1).amax(1)
    core = depths >= ((deepest + 1) // 2).clamp(min=1)[:, None, None]
    scores = torch.rand(core.shape, generator=generator, device=pred.device) * core  # uniform among the core
    flat = scores.flatten(1).argmax(1)
    width = pred.shape[-1]
    points = torch.stack([flat % width, flat // width], dim=1)
    found = deepest > 0
    labels = torch.where(found, positive.long(), torch.full_like(flat, PAD_LABEL))
    return points, labels
