"""Per-instance segmentation loss: MONAI Dice + focal on valid instances, the IoU head's MSE, and (SAM 2 / 3)
the object-score head's BCE."""

from __future__ import annotations

import torch
from torch import nn

from samtune.data.batch import SamBatch


class InstanceLoss(nn.Module):
    """Loss per instance (no reduction over instances), so callers can pick the best of several masks.

    Crowd pixels (``keep`` False) count neither in Dice nor in focal loss.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        focal_weight: float = 20.0,
        iou_weight: float = 1.0,
        object_score_weight: float = 1.0,
    ) -> None:
        from monai.losses import FocalLoss, MaskedDiceLoss  # here: importing monai takes seconds, --help need not

        super().__init__()
        self.dice = MaskedDiceLoss(sigmoid=True, reduction="none")
        self.focal = FocalLoss(reduction="none", use_softmax=False)
        self.dice_weight, self.focal_weight, self.iou_weight = dice_weight, focal_weight, iou_weight
        self.object_score_weight = object_score_weight

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


def batch_loss(outputs, batch: SamBatch, loss_fn: InstanceLoss) -> dict[str, torch.Tensor]:
    """Loss of a batch: per image, the mean over its valid instances; then the mean over images.

    Padded instances never reach the loss. Weighting images equally makes a batch of 4 the same step as
    2 x 2 accumulated (or 2 processes x 2). With several masks per prompt (point prompts), each instance
    trains only its best mask, as SAM does. Families with an object-score head (SAM 2 / 3) also train it
    towards "present" for every prompted instance (BCE, as SAM 2's trainer does for objects in the frame).
    """
    valid = batch["valid"]
    masks, scores = outputs.pred_masks, outputs.iou_scores  # (B, K, M, h, w), (B, K, M)
    count = masks.shape[2]
    logits = masks[valid]  # (N, M, h, w)
    targets = batch["low_res_masks"][valid][:, None].expand_as(logits)
    keep = (~batch["low_res_ignore"])[:, None].expand(-1, valid.shape[1], -1, -1)[valid][:, None].expand_as(logits)
    losses = loss_fn(logits.flatten(0, 1), targets.flatten(0, 1), keep.flatten(0, 1), scores[valid].flatten())
    losses = {name: value.view(-1, count) for name, value in losses.items()}
    best = losses["loss"].argmin(dim=1, keepdim=True)
    per_instance = {name: value.gather(1, best)[:, 0] for name, value in losses.items()}
    object_scores = getattr(outputs, "object_score_logits", None)
    if object_scores is not None:  # (B, K, 1): one per query; BCE against 1 is softplus(-logit)
        per_instance["object_score"] = torch.nn.functional.softplus(-object_scores[valid][:, 0].float())
        per_instance["loss"] = per_instance["loss"] + loss_fn.object_score_weight * per_instance["object_score"]
    image_of = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)[valid]
    images = valid.any(dim=1)
    out = {}
    for name, value in per_instance.items():
        per_image = torch.zeros(valid.shape[0], device=value.device, dtype=value.dtype).index_add(0, image_of, value)
        out[name] = (per_image[images] / valid.sum(dim=1)[images]).mean()
    return out
