"""How samtune scores a model, in one place: the forward pass, per-instance IoU / F1 at the original
resolution, their aggregation, and COCO AP. Training-time validation and ``samtune.evaluate`` score through
these functions, so the same weights on the same split give the same numbers in both; ``samtune.predict``
writes its masks with ``encode_rle``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from samtune.data.batch import SamBatch, prompts_of, uses_multimask
from samtune.models.family import decoder_inputs, forward_options, post_process_masks


def sam_forward(
    model,
    batch: SamBatch,
    features: dict[str, torch.Tensor] | None = None,
    multimask_output: bool | None = None,
    hq_token_only: bool = False,
):
    """The model on a batch: one image-encoder pass per image (skipped when ``features``, from
    ``samtune.models.family.image_features`` or the embedding cache, are given), one decoder query per (padded)
    instance. ``hq_token_only`` is SAM-HQ's choice of mask; other families ignore it."""
    multimask = uses_multimask(batch) if multimask_output is None else multimask_output
    images = {"pixel_values": batch["pixel_values"]} if features is None else decoder_inputs(model, features)
    options = forward_options(model, hq_token_only)
    return model(**images, multimask_output=multimask, **options, **prompts_of(batch))


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


def instance_iou_f1(
    pred: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and F1 (Dice) of K binary masks (K, H, W) against K targets; both empty counts as a perfect 1.
    Crowd pixels (``ignore``) are not scored."""
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


@torch.no_grad()
def score_batch(outputs, batch: SamBatch, processor, with_rle: bool = False) -> list[dict]:
    """Per-instance records for the valid instances of one evaluation batch.

    ``with_rle`` adds the predicted mask at original resolution as COCO RLE and the predicted IoU as score.
    """
    logits, scores = predicted_masks(outputs)
    masks = post_process_masks(
        processor, logits[:, :, None].cpu(), batch["original_sizes"].cpu(), batch["reshaped_input_sizes"].cpu()
    )
    present = getattr(outputs, "object_score_logits", None)
    records = []
    for row, predicted in enumerate(masks):
        valid = batch["valid"][row].cpu()
        count = int(valid.sum())
        iou, f1 = instance_iou_f1(
            predicted[:count, 0], batch["original_masks"][row].cpu(), batch["original_ignore"][row].cpu()
        )
        for k in range(count):
            record = {
                "image_id": int(batch["image_id"][row]),
                "annotation_id": int(batch["annotation_ids"][row, k]),
                "category_id": int(batch["category_ids"][row, k]),
                "iou": float(iou[k]),
                "f1": float(f1[k]),
            }
            if present is not None:  # SAM 2 / 3: did the model say the (prompted, so present) object is there
                record["object_present"] = bool(present[row, k].max() > 0)
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
    scored_presence = [r["object_present"] for r in unique if "object_present" in r]
    presence = {"object_present": float(np.mean(scored_presence))} if scored_presence else {}
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
        **presence,  # share of instances whose object score says present (SAM 2 / 3)
    }


@torch.no_grad()
def score_loader(
    loader: Iterable[SamBatch],
    forward: Callable[[SamBatch], object],
    processor,
    with_rle: bool = False,
    on_batch: Callable[[SamBatch, object], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Per-instance records of ``forward`` over a loader (this process's share of it, under accelerate);
    ``on_batch(batch, outputs)`` sees each batch, e.g. to draw overlays."""
    records: list[dict] = []
    with tqdm(loader, desc="eval", disable=not progress, leave=False) as batches:  # cleared on errors too
        for batch in batches:
            outputs = forward(batch)
            records += score_batch(outputs, batch, processor, with_rle=with_rle)
            if on_batch is not None:
                on_batch(batch, outputs)
    return records


def detections(records: list[dict]) -> list[dict]:
    """COCO results entries (RLE mask, predicted IoU as score) from scored records."""
    return [
        {
            "image_id": r["image_id"],
            "category_id": r["category_id"],
            "segmentation": r["segmentation"],
            "score": r["score"],
        }
        for r in records
    ]


def coco_metrics(annotation_file: str | Path, results: list[dict], class_agnostic: bool = False) -> dict:
    """pycocotools' COCOeval on segmentation masks: AP, AP50, AP75 (fractions).

    ``class_agnostic`` scores masks made without prompts (``samtune.automatic_masks``): categories are ignored
    (``useCats = 0``), up to 1000 masks an image count (SAM's proposal setting), AP / AP50 / AP75 are at 1000
    masks, and the average recall at 10, 100 and 1000 masks comes too (AR10, AR100, AR1000).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    keys = ("AP", "AP50", "AP75") + (("AR10", "AR100", "AR1000") if class_agnostic else ())
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        truth = COCO(str(annotation_file))
        if not results or (class_agnostic and not truth.getCatIds()):
            return dict.fromkeys(keys, 0.0)
        if class_agnostic:  # without categories COCOeval still gathers masks per category id it knows: one of those
            results = [{**r, "category_id": truth.getCatIds()[0]} for r in results]
        predicted = truth.loadRes(copy.deepcopy(results))  # loadRes writes bbox / area / id into its input
        evaluator = COCOeval(truth, predicted, iouType="segm")
        if class_agnostic:
            evaluator.params.useCats = 0
            evaluator.params.maxDets = [10, 100, 1000]
        evaluator.evaluate()
        evaluator.accumulate()
        if not class_agnostic:
            evaluator.summarize()
    if not class_agnostic:
        ap, ap50, ap75 = (float(v) for v in evaluator.stats[:3])
        return {"AP": ap, "AP50": ap50, "AP75": ap75}
    # summarize() mixes 100 and maxDets[2] in its AP lines: read the accumulated arrays as it does, all areas
    precision, recall = evaluator.eval["precision"], evaluator.eval["recall"]  # (T, R, K, A, M), (T, K, A, M)
    thresholds = list(np.round(evaluator.params.iouThrs, 2))
    out = {
        "AP": _coco_mean(precision[:, :, :, 0, -1]),
        "AP50": _coco_mean(precision[thresholds.index(0.5), :, :, 0, -1]),
        "AP75": _coco_mean(precision[thresholds.index(0.75), :, :, 0, -1]),
    }
    for m, count in enumerate(evaluator.params.maxDets):
        out[f"AR{count}"] = _coco_mean(recall[:, :, 0, m])
    return out


def _coco_mean(values: np.ndarray) -> float:
    """The mean over what COCOeval could score (it marks the rest -1), -1 when nothing could be, as it does."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0
