"""Per-instance segmentation loss: MONAI Dice + focal on valid instances, plus the IoU head's MSE."""

from __future__ import annotations

import torch
from monai.losses import FocalLoss, MaskedDiceLoss
from torch import nn


class InstanceLoss(nn.Module):
    """Loss per instance (no reduction over instances), so callers can pick the best of several masks.

    Crowd pixels (``keep`` False) count neither in Dice nor in focal loss.
    """

    def __init__(self, dice_weight: float = 1.0, focal_weight: float = 20.0, iou_weight: float = 1.0) -> None:
        super().__init__()
        self.dice = MaskedDiceLoss(sigmoid=True, reduction="none")
        self.focal = FocalLoss(reduction="none", use_softmax=False)
        self.dice_weight, self.focal_weight, self.iou_weight = dice_weight, focal_weight, iou_weight

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, iou_pred: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``logits``, ``targets``: (N, h, w) for N valid instances; ``keep``: (N, h, w); ``iou_pred``: (N,)."""
        logits, targets, keep = logits[:, None].float(), targets[:, None].float(), keep[:, None].float()
        dice = self.dice(logits, targets, mask=keep).flatten(1).mean(1)
        focal = (self.focal(logits, targets) * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp(min=1)
        with torch.no_grad():
            predicted = (logits > 0).float() * keep
            inter = (predicted * targets).flatten(1).sum(1)
            union = ((predicted + targets * keep) > 0).float().flatten(1).sum(1)
            true_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        iou = (iou_pred.float() - true_iou) ** 2
        total = self.dice_weight * dice + self.focal_weight * focal + self.iou_weight * iou
        return {"loss": total, "dice": dice, "focal": focal, "iou_mse": iou}
