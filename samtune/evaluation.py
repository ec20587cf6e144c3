"""Scoring a model on a data loader: per-instance IoU / F1 at original resolution, aggregated once per instance."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from pycocotools import mask as mask_utils

from samtune.metrics import instance_iou_f1

PROMPT_KEYS = ("input_boxes", "input_points", "input_labels")


def uses_multimask(batch: dict) -> bool:
    """Point prompts alone are ambiguous: SAM then predicts three masks (whole, part, sub-part)."""
    return "input_points" in batch and "input_boxes" not in batch


def sam_forward(model, batch: dict, multimask_output: bool | None = None):
    """One image-encoder pass per image, one decoder query per (padded) instance."""
    inputs = {key: batch[key] for key in PROMPT_KEYS if key in batch}
    multimask = uses_multimask(batch) if multimask_output is None else multimask_output
    return model(pixel_values=batch["pixel_values"], multimask_output=multimask, **inputs)


def predicted_masks(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, h, w) logits and (B, K) predicted IoU; of several masks, the one with the highest predicted IoU."""
    scores = outputs.iou_scores.float()
    best = scores.argmax(dim=2)
    logits = outputs.pred_masks.gather(
        2, best[:, :, None, None, None].expand(-1, -1, 1, *outputs.pred_masks.shape[-2:])
    )
    return logits[:, :, 0].float(), scores.gather(2, best[:, :, None])[:, :, 0]


def encode_rle(mask: torch.Tensor) -> dict:
    """COCO compressed RLE of a binary (H, W) mask, JSON-ready."""
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@torch.no_grad()
def score_batch(outputs, batch: dict, processor, with_rle: bool = False) -> list[dict]:
    """Per-instance records for the valid instances of one evaluation batch.

    ``with_rle`` adds the predicted mask at original resolution as COCO RLE and the predicted IoU as score.
    """
    logits, scores = predicted_masks(outputs)
    masks = processor.post_process_masks(
        logits[:, :, None].cpu(), batch["original_sizes"].cpu(), batch["reshaped_input_sizes"].cpu()
    )
    records = []
    for row, predicted in enumerate(masks):
        valid = batch["valid"][row].cpu()
        count = int(valid.sum())
        iou, f1 = instance_iou_f1(predicted[:count, 0], batch["masks"][row].cpu(), batch["ignore_full"][row].cpu())
        for k in range(count):
            record = {
                "image_id": int(batch["image_id"][row]),
                "annotation_id": int(batch["annotation_ids"][row, k]),
                "category_id": int(batch["category_ids"][row, k]),
                "iou": float(iou[k]),
                "f1": float(f1[k]),
            }
            if with_rle:
                record["segmentation"] = encode_rle(predicted[k, 0])
                record["score"] = float(scores[row, k])
            records.append(record)
    return records


def aggregate(records: list[dict], categories: dict[int, str] | None = None) -> dict:
    """mIoU / mF1 over instances, image-averaged variants, and per category; each instance counted once."""
    unique = {(r["image_id"], r["annotation_id"]): r for r in records}.values()
    if not unique:
        return {"mIoU": float("nan"), "mF1": float("nan"), "num_instances": 0, "num_images": 0}
    per_image, per_category = defaultdict(list), defaultdict(list)
    for r in unique:
        per_image[r["image_id"]].append(r)
        per_category[r["category_id"]].append(r)
    names = categories or {}
    return {
        "mIoU": float(np.mean([r["iou"] for r in unique])),
        "mF1": float(np.mean([r["f1"] for r in unique])),
        "mIoU_image": float(np.mean([np.mean([r["iou"] for r in rs]) for rs in per_image.values()])),
        "mF1_image": float(np.mean([np.mean([r["f1"] for r in rs]) for rs in per_image.values()])),
        "per_category": {
            names.get(cat, str(cat)): {
                "mIoU": float(np.mean([r["iou"] for r in rs])),
                "mF1": float(np.mean([r["f1"] for r in rs])),
                "count": len(rs),
            }
            for cat, rs in sorted(per_category.items())
        },
        "num_instances": len(unique),
        "num_images": len(per_image),
    }
