"""IoU and F1 per instance, at the original image resolution; crowd pixels are not scored."""

from __future__ import annotations

import torch


def instance_iou_f1(
    pred: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and F1 (Dice) of K binary masks (K, H, W) against K targets; both empty counts as a perfect 1."""
    pred, target = pred.bool(), target.bool()
    if ignore is not None:
        pred, target = pred & ~ignore.bool(), target & ~ignore.bool()
    inter = (pred & target).flatten(1).sum(1).double()
    pred_area, target_area = pred.flatten(1).sum(1).double(), target.flatten(1).sum(1).double()
    union = pred_area + target_area - inter
    empty = union == 0
    iou = torch.where(empty, torch.ones_like(inter), inter / union.clamp(min=1))
    f1 = torch.where(empty, torch.ones_like(inter), 2 * inter / (pred_area + target_area).clamp(min=1))
    return iou, f1
